"""GradCAM of the worst queries: `python scripts/explain.py run=<MLflow run id>` or `ckpt=<best.ckpt> dataset.root=<data>`."""
import hydra
from omegaconf import DictConfig

import metriclab.core.config  # noqa: F401  (registers the `repo_root` resolver before Hydra composes)
from metriclab.jobs.explain import explain
from metriclab.core.paths import CONFIGS_DIR


@hydra.main(config_path=str(CONFIGS_DIR), config_name="explain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    explain(cfg)


if __name__ == "__main__":
    main()
