"""`make demo`: train configs/digits_demo.yaml, then validate its best checkpoint; prints before/after metrics."""
import hydra
from omegaconf import DictConfig

import metriclab.core.config  # noqa: F401  (registers the `repo_root` resolver before Hydra composes)
from metriclab.jobs.demo import run_demo
from metriclab.core.paths import CONFIGS_DIR


@hydra.main(config_path=str(CONFIGS_DIR), config_name="digits_demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
