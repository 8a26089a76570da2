"""Train an experiment: `python scripts/train.py --config-name market_arcface dataset.root=/data/market`.

Hydra composes the config; `metriclab.jobs.entry` checks it (torch-free, so usage errors answer at once) and only
then imports and runs the job. `main` returns the run's best `metric_for_checkpointing`: the objective an Optuna
study (`hparams_search=<name> -m`) optimises.
"""
import hydra
from omegaconf import DictConfig

from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs import entry  # also registers the config resolvers before Hydra composes


@hydra.main(config_path=str(CONFIGS_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return entry.run("train", cfg)["objective"]


if __name__ == "__main__":
    entry.launch(main)
