"""`make demo-glyphs`: the open-set (zero-shot) comparison on the rendered glyphs (scripts/prepare_glyphs.py).

Trains configs/glyphs_demo.yaml twice, batch-hard triplet (evaluating the random-init model first) and ArcFace, and
prints one table: random init vs each loss on the validation classes, none of which is seen in training. The
numbers are each run's validation after its last epoch (the config validates only then), so no model is picked on
the held-out classes. Extra arguments are Hydra overrides applied to both runs:

    python scripts/demo_glyphs.py [dataset.root=outputs/data/glyphs] [trainer.max_epochs=40] ...
"""
from __future__ import annotations

import sys
from typing import Dict, List

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs import entry

#: table column -> the overrides of its run (the random-init column comes from the triplet run's pass before training)
RUNS: Dict[str, List[str]] = {
    "batch-hard triplet": ["criterion=triplet_hard", "validate_before_training=true",
                           "config_name=glyphs_demo-triplet"],
    "ArcFace": ["criterion=arcface", "config_name=glyphs_demo-arcface"],
}
ROWS = ("mAP", "cmc@1", "cmc@5", "precision@5", "precision@20", "map@5", "mINP")


def compose_run(overrides: List[str]) -> DictConfig:
    """The config of one run; its folder is outputs/train/<timestamp> as with scripts/train.py."""
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = compose(config_name="glyphs_demo",
                      overrides=["paths.run_dir=${paths.outputs_dir}/${task}/${timestamp}", *overrides])
    return entry.prepare("train", cfg)


def table(columns: Dict[str, Dict[str, float]]) -> str:
    names = list(columns)
    lines = [f"{'metric':<14}" + "".join(f"{n:>20}" for n in names), "-" * (14 + 20 * len(names))]
    for row in ROWS:
        if all(row in m for m in columns.values()):
            lines.append(f"{row:<14}" + "".join(f"{columns[n][row]:>20.4f}" for n in names))
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    try:
        configs = {name: compose_run(overrides + argv) for name, overrides in RUNS.items()}
    except (ConfigError, HydraException) as e:
        entry.usage_error(e)
    from metriclab.jobs.train import train  # torch, Lightning, MLflow: only once the configs passed their checks

    columns: Dict[str, Dict[str, float]] = {}
    run_dirs = []
    for name, cfg in configs.items():
        result = train(cfg)
        if result["init_metrics"] is not None:
            columns["random init"] = result["init_metrics"]
        columns[name] = result["metrics"]
        run_dirs.append(f"{name}: {result['run_dir']}")
    n_queries = int(columns["ArcFace"]["n_queries"])
    print(f"\nGlyphs demo, open set: {n_queries} queries of classes never seen in training, every validation image "
          f"also in the gallery\n{table(columns)}\n" + "\n".join(run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
