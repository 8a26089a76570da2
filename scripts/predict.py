"""Top-k neighbours of new images: `python scripts/predict.py ckpt=<best.ckpt> dataset.root=<data> images=<path> k=10`."""
import hydra
from omegaconf import DictConfig

import metriclab.core.config  # noqa: F401  (registers the `repo_root` resolver before Hydra composes)
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs.predict import predict


@hydra.main(config_path=str(CONFIGS_DIR), config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
