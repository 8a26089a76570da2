"""The tags every run carries: what ran (config, task, dataset, run dir), from which code (git) and with which
packages. Plain facts, read by the report and by anyone reproducing a run."""
from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig

from metriclab.core.config import config_name_of
from metriclab.core.paths import REPO_ROOT
from metriclab.tracking.debug import debug_tags

PACKAGES_TO_TAG = ("torch", "torchvision", "open-metric-learning", "pytorch-lightning", "mlflow", "hydra-core")


def git_state() -> Dict[str, str]:
    """`git_commit` (HEAD) and `git_dirty` (tracked files changed): "unknown" outside a git checkout."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def package_versions() -> Dict[str, str]:
    tags = {}
    for name in PACKAGES_TO_TAG:
        try:
            tags[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            tags[f"version.{name}"] = "not installed"
    return tags


def run_tags(cfg: DictConfig, run_dir: Path) -> Dict[str, str]:
    has_root = cfg.get("dataset") and cfg.dataset.get("root")
    return {
        "config_name": config_name_of(cfg),  # the --config-name when `config_name` is not set
        "task": str(cfg.get("task", "unknown")),
        "dataset": Path(str(cfg.dataset.root)).name if has_root else "none",
        "run_dir": str(run_dir),
        **git_state(),
        **package_versions(),
        **source_tags(cfg),
        **debug_tags(cfg),  # metriclab.debug=<name> on debug runs (debug=<name>)
    }


def source_tags(cfg: DictConfig) -> Dict[str, str]:
    """MLflow's standard source tags (its runs table's Source column): the entry script and the git commit."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"scripts/{cfg.get('task', 'train')}.py"}
    commit = git_state()["git_commit"]
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags
