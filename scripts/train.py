"""Train an experiment: `python scripts/train.py --config-name market_arcface dataset.root=/data/market`."""
import hydra
from omegaconf import DictConfig

import metriclab.core.config  # noqa: F401  (registers the `repo_root` resolver before Hydra composes)
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs.train import train


@hydra.main(config_path=str(CONFIGS_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
