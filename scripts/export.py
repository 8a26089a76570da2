"""Export a checkpoint to ONNX: `python scripts/export.py ckpt=outputs/train/<timestamp>/checkpoints/best.ckpt`.

Hydra composes the config; the checkpoint's training run is filled in (`metriclab.jobs.export.export_config`, like
validate's run=), `metriclab.jobs.entry` checks the config and then runs the job.
"""
import hydra
from omegaconf import DictConfig

from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs import entry  # also registers the config resolvers before Hydra composes
from metriclab.jobs.export import export_config

# the job by name, for entry.run (entry.JOBS lists the jobs of the other scripts)
entry.JOBS.setdefault("export", ("metriclab.jobs.export", "export"))


@hydra.main(config_path=str(CONFIGS_DIR), config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        cfg = export_config(cfg, entry.hydra_overrides())
    except ConfigError as e:  # before the job: Hydra's empty run folder goes, as entry.run does for its checks
        entry.remove_unused_run_dir(entry.outputs_dir_of(cfg))
        entry.usage_error(e)
    entry.run("export", cfg)


if __name__ == "__main__":
    entry.launch(main)
