"""Export a checkpoint to ONNX: `python scripts/export.py ckpt=outputs/train/<timestamp>/checkpoints/best.ckpt`.

Hydra composes the config; `metriclab.jobs.entry` fills in the checkpoint's training run (like validate's run=),
checks the config (usage errors answer before torch loads) and only then runs the job.
"""
import hydra
from omegaconf import DictConfig

from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs import entry  # also registers the config resolvers before Hydra composes


@hydra.main(config_path=str(CONFIGS_DIR), config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry.run("export", cfg)


if __name__ == "__main__":
    entry.launch(main)
