"""Every use of a third-party private API, in one place, each checked against the versions it was written for.

A private name can change in any release. Each shim below names the package and the version range it was tested
with (`TESTED`); outside that range it logs one warning and still tries, and when the private name is gone it
raises `CompatError` saying which shim and which installed version, instead of a silent wrong result.
`tests/test_compat.py` exercises every shim against the pinned versions.

Heavy packages are imported inside the shims: importing this module costs nothing.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

#: package -> the release prefix every shim for it was written and tested against
TESTED = {
    "mlflow": "3.17.",
    "neptune": "1.14.",
    "pytorch-lightning": "2.5.",
    "open-metric-learning": "4.0.",
}


class CompatError(RuntimeError):
    """A private API a shim relies on is gone: the installed package is newer than the shim."""


def installed_version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def check_version(package: str) -> bool:
    """True when `package` is in its tested range; otherwise log one warning (per package and process)."""
    found = installed_version(package)
    ok = found is not None and found.startswith(TESTED[package])
    if not ok:
        log.warning("metriclab.core.compat: %s %s is installed, the shims were tested with %sx; if something breaks, "
                    "pin %s==%sx (requirements.txt)", package, found, TESTED[package], package, TESTED[package])
    return ok


def _missing(shim: str, package: str, what: str, error: Exception) -> CompatError:
    return CompatError(f"{shim}: {package} {installed_version(package)} has no {what} ({error}); metriclab was tested "
                       f"with {package} {TESTED[package]}x: install that version (requirements.txt)")


# ----------------------------------------------------------------------------------------------------------- MLflow
def mlflow_reset_tracking_uri(env_uri: Optional[str]) -> None:
    """Undo `mlflow.set_tracking_uri` (which PL's MLFlowLogger calls): the process-wide default and the environment
    variable go back to what they were, so the next job in this process reads its own config."""
    check_version("mlflow")
    try:
        import mlflow.tracking._tracking_service.utils as tracking_utils

        # assigning a module attribute never fails: check that MLflow still reads this one
        if not hasattr(tracking_utils, "_tracking_uri"):
            raise AttributeError("_tracking_uri")
        tracking_utils._tracking_uri = None
    except (ImportError, AttributeError) as e:
        raise _missing("mlflow_reset_tracking_uri", "mlflow", "mlflow.tracking._tracking_service.utils._tracking_uri",
                       e) from e
    if env_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env_uri


# --------------------------------------------------------------------------------------------------------- Neptune
def neptune_stop_run(logger: Any) -> bool:
    """Stop the Neptune run a PL NeptuneLogger holds (otherwise it stops only at interpreter exit). Returns whether
    there was one to stop. PL exposes the run only through `experiment`, which would create one if none exists.
    The private name is Lightning's (its NeptuneLogger sets it in __init__, None until a run exists)."""
    check_version("neptune")
    check_version("pytorch-lightning")
    if not hasattr(logger, "_run_instance"):
        raise _missing("neptune_stop_run", "pytorch-lightning", "NeptuneLogger._run_instance",
                       AttributeError("_run_instance"))
    run = logger._run_instance
    if run is None:
        return False
    run.stop()
    return True


# ------------------------------------------------------------------------------------------------ PyTorch Lightning
def ddp_finds_unused_parameters(strategy: Any) -> bool:
    """Whether a Lightning DDPStrategy was created with `find_unused_parameters=True` (no public accessor)."""
    check_version("pytorch-lightning")
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if kwargs is None:
        raise _missing("ddp_finds_unused_parameters", "pytorch-lightning", "DDPStrategy._ddp_kwargs",
                       AttributeError("_ddp_kwargs"))
    return bool(kwargs.get("find_unused_parameters", False))


def mlflow_logger_log_checkpoints(logger: Any) -> bool:
    """What PL's `MLFlowLogger.finalize` does besides ending the run: send the checkpoints it still has to log
    (only with `log_model`) as artifacts. Returns whether there were any to scan. No public accessor exists."""
    check_version("pytorch-lightning")
    try:
        initialized, callback = logger._initialized, logger._checkpoint_callback
        scan = logger._scan_and_log_checkpoints
    except AttributeError as e:
        raise _missing("mlflow_logger_log_checkpoints", "pytorch-lightning", "MLFlowLogger._initialized, "
                       "_checkpoint_callback or _scan_and_log_checkpoints", e) from e
    if not (initialized and callback):
        return False
    scan(callback)
    return True


# ------------------------------------------------------------------------------------------------------------- OML
def oml_hard_triplets(distmat: Any, labels: Sequence[int]) -> Tuple[List[int], List[int], List[int]]:
    """OML's batch-hard triplet choice on a precomputed distance matrix (anchor, hardest positive, hardest negative)."""
    check_version("open-metric-learning")
    from oml.miners.inbatch_hard_tri import HardTripletsMiner

    try:
        sample = HardTripletsMiner._sample_from_distmat
    except AttributeError as e:
        raise _missing("oml_hard_triplets", "open-metric-learning", "HardTripletsMiner._sample_from_distmat", e) from e
    ids_a, ids_p, ids_n = sample(distmat=distmat, labels=list(labels))
    return list(ids_a), list(ids_p), list(ids_n)


def oml_principal_axes(explained_variance_ratio: Any, pcf_variance: Tuple[float, ...]) -> Any:
    """OML's count of principal axes for each variance share, from explained-variance ratios we computed ourselves
    (OML's PCA would need the whole N x D matrix): the PCA object is made without its constructor."""
    check_version("open-metric-learning")
    from oml.utils.misc_torch import PCA

    pca = PCA.__new__(PCA)
    pca.explained_variance_ratio = explained_variance_ratio
    try:
        return pca.calc_principal_axes_number(pcf_variance)
    except AttributeError as e:
        raise _missing("oml_principal_axes", "open-metric-learning", "PCA.calc_principal_axes_number reading only "
                       "explained_variance_ratio", e) from e
