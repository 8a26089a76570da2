"""GradCAM of the worst queries: `python scripts/explain.py run=<MLflow run id>`
or `python scripts/explain.py ckpt=<best.ckpt> dataset.root=<data>`.

Hydra composes the config; `metriclab.jobs.entry` checks it (torch-free, so usage errors answer at once) and only
then imports and runs the job.
"""
import hydra
from omegaconf import DictConfig

from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs import entry  # also registers the config resolvers before Hydra composes


@hydra.main(config_path=str(CONFIGS_DIR), config_name="explain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    entry.run("explain", cfg)


if __name__ == "__main__":
    entry.launch(main)
