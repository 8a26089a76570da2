"""Evaluate a checkpoint: `python scripts/validate.py dataset.root=/data/x ckpt=outputs/train/.../best.ckpt`."""
import hydra
from omegaconf import DictConfig

import metriclab.core.config  # noqa: F401  (registers the `repo_root` resolver before Hydra composes)
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs.validate import validate


@hydra.main(config_path=str(CONFIGS_DIR), config_name="validate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    validate(cfg)


if __name__ == "__main__":
    main()
