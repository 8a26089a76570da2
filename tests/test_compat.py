"""Every shim of metriclab.core.compat against the pinned versions, with values computed by hand; and what each
shim does when the private name it relies on is gone (CompatError naming the shim) or the version is untested."""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import mlflow
import mlflow.tracking._tracking_service.utils as tracking_utils
import pytest
import torch
from oml.miners.inbatch_hard_tri import HardTripletsMiner
from oml.utils.misc_torch import PCA
from pytorch_lightning.strategies import DDPStrategy

from metriclab.core import compat
from metriclab.core.compat import (
    TESTED,
    CompatError,
    check_version,
    ddp_finds_unused_parameters,
    mlflow_logger_log_checkpoints,
    mlflow_reset_tracking_uri,
    neptune_stop_run,
    oml_hard_triplets,
    oml_principal_axes,
)


@pytest.fixture
def fresh_version_cache():
    check_version.cache_clear()
    yield
    check_version.cache_clear()  # the next test sees the real versions again


# --------------------------------------------------------------------------------------------------- check_version
@pytest.mark.parametrize("package", sorted(TESTED))
def test_check_version_true_for_the_installed_pins(package, fresh_version_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="metriclab.core.compat"):
        assert check_version(package) is True
    assert caplog.records == []


def test_check_version_warns_once_outside_tested(monkeypatch, fresh_version_cache, caplog):
    monkeypatch.setattr(compat, "installed_version", lambda package: "99.0.1")
    with caplog.at_level(logging.WARNING, logger="metriclab.core.compat"):
        assert check_version("mlflow") is False
        assert check_version("mlflow") is False  # cached: no second warning
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert caplog.records[0].levelno == logging.WARNING
    assert "mlflow 99.0.1 is installed, the shims were tested with 3.17.x" in message
    assert "pin mlflow==3.17.x" in message


def test_check_version_false_when_not_installed(monkeypatch, fresh_version_cache, caplog):
    monkeypatch.setattr(compat, "installed_version", lambda package: None)
    with caplog.at_level(logging.WARNING, logger="metriclab.core.compat"):
        assert check_version("neptune") is False
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "metriclab.core.compat: neptune None is installed"]


def test_installed_version_of_a_missing_package_is_none():
    assert compat.installed_version("surely-not-a-package-metriclab") is None
    assert compat.installed_version("mlflow").startswith("3.17.")


# ----------------------------------------------------------------------------------------------------------- MLflow
@pytest.fixture
def clean_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    tracking_utils._tracking_uri = None


def test_mlflow_reset_tracking_uri_pops_the_env_var(tmp_path, clean_tracking_uri):
    default = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/a.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/a.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/a.db"  # MLflow sets it for the process
    mlflow_reset_tracking_uri(None)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_utils._tracking_uri is None
    assert mlflow.get_tracking_uri() == default != f"sqlite:///{tmp_path}/a.db"


def test_mlflow_reset_tracking_uri_restores_the_env_var(tmp_path, clean_tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/job.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/job.db"
    mlflow_reset_tracking_uri(f"sqlite:///{tmp_path}/env.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/env.db"
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/env.db"  # read from the variable again


def test_mlflow_reset_tracking_uri_missing_private_name(monkeypatch, clean_tracking_uri):
    monkeypatch.delattr(tracking_utils, "_tracking_uri")
    with pytest.raises(CompatError, match=r"^mlflow_reset_tracking_uri: mlflow 3\.17\.\S+ has no "
                                          r"mlflow\.tracking\._tracking_service\.utils\._tracking_uri .*3\.17\.x"):
        mlflow_reset_tracking_uri(None)
    assert not hasattr(tracking_utils, "_tracking_uri")  # not created as a new, unread attribute


# --------------------------------------------------------------------------------------------------------- Neptune
def test_neptune_stop_run_stops_the_run_instance():
    stopped = []
    logger = SimpleNamespace(_run_instance=SimpleNamespace(stop=lambda: stopped.append(True)))
    assert neptune_stop_run(logger) is True
    assert stopped == [True]
    assert neptune_stop_run(SimpleNamespace(_run_instance=None)) is False


def test_neptune_stop_run_on_a_real_logger_without_a_run():
    from pytorch_lightning.loggers import NeptuneLogger

    logger = NeptuneLogger(project="metriclab/metriclab", mode="debug")  # no run until `experiment` is read
    assert logger._run_instance is None
    assert neptune_stop_run(logger) is False


def test_neptune_stop_run_missing_private_name():
    with pytest.raises(CompatError, match=r"^neptune_stop_run: pytorch-lightning 2\.5\.\S+ has no "
                                          r"NeptuneLogger\._run_instance"):
        neptune_stop_run(SimpleNamespace())


# ------------------------------------------------------------------------------------------------ PyTorch Lightning
def test_ddp_finds_unused_parameters_on_real_strategies():
    assert ddp_finds_unused_parameters(DDPStrategy(find_unused_parameters=True)) is True
    assert ddp_finds_unused_parameters(DDPStrategy(find_unused_parameters=False)) is False
    assert ddp_finds_unused_parameters(DDPStrategy()) is False


def test_ddp_finds_unused_parameters_missing_private_name(monkeypatch):
    strategy = DDPStrategy(find_unused_parameters=True)
    monkeypatch.delattr(strategy, "_ddp_kwargs")
    with pytest.raises(CompatError, match=r"^ddp_finds_unused_parameters: pytorch-lightning 2\.5\.\S+ has no "
                                          r"DDPStrategy\._ddp_kwargs"):
        ddp_finds_unused_parameters(strategy)


def test_mlflow_logger_log_checkpoints_scans_only_a_pending_callback(tmp_path):
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert logger._initialized is False and logger._checkpoint_callback is None
    assert mlflow_logger_log_checkpoints(logger) is False  # never initialized, no `log_model`: nothing to log
    scanned = []
    logger._initialized, logger._checkpoint_callback = True, "the checkpoint callback"
    logger._scan_and_log_checkpoints = scanned.append
    assert mlflow_logger_log_checkpoints(logger) is True
    assert scanned == ["the checkpoint callback"]


def test_mlflow_logger_log_checkpoints_missing_private_name():
    with pytest.raises(CompatError, match=r"^mlflow_logger_log_checkpoints: pytorch-lightning 2\.5\.\S+ has no "
                                          r"MLFlowLogger\._initialized, _checkpoint_callback or "
                                          r"_scan_and_log_checkpoints"):
        mlflow_logger_log_checkpoints(SimpleNamespace(_initialized=True, _checkpoint_callback=None))


# ------------------------------------------------------------------------------------------------------------- OML
# 4 points, labels [0, 0, 1, 1]; the symmetric distances chosen so that every hardest choice is unique:
#        0    1    2    3
#   0  0.0  1.0  2.0  4.0     anchor 0: positive 1 (1.0), hardest negative 2 (2.0)
#   1  1.0  0.0  5.0  0.5     anchor 1: positive 0 (1.0), hardest negative 3 (0.5)
#   2  2.0  5.0  0.0  3.0     anchor 2: positive 3 (3.0), hardest negative 0 (2.0 < 5.0)
#   3  4.0  0.5  3.0  0.0     anchor 3: positive 2 (3.0), hardest negative 1 (0.5 < 4.0)
DISTMAT = torch.tensor([[0.0, 1.0, 2.0, 4.0], [1.0, 0.0, 5.0, 0.5], [2.0, 5.0, 0.0, 3.0], [4.0, 0.5, 3.0, 0.0]])


def test_oml_hard_triplets_hand_computed():
    assert oml_hard_triplets(DISTMAT, [0, 0, 1, 1]) == ([0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1])


def test_oml_hard_triplets_picks_the_farthest_positive():
    # labels [0, 0, 0, 1]: anchor 0's positives are 1 (1.0) and 2 (2.0): the hardest is 2; anchor 2's are 0 (2.0)
    # and 1 (5.0): 1; the one point of label 1 is its own positive (the diagonal is not excluded), its hardest
    # negative is 1 (0.5); every other anchor has 3 as its only negative
    a, p, n = oml_hard_triplets(DISTMAT, [0, 0, 0, 1])
    assert (a, p, n) == ([0, 1, 2, 3], [2, 2, 1, 3], [3, 3, 3, 1])
    assert all(isinstance(i, int) for i in p + n)


def test_oml_hard_triplets_missing_private_name(monkeypatch):
    monkeypatch.delattr(HardTripletsMiner, "_sample_from_distmat")
    with pytest.raises(CompatError, match=r"^oml_hard_triplets: open-metric-learning 4\.0\.\S+ has no "
                                          r"HardTripletsMiner\._sample_from_distmat"):
        oml_hard_triplets(DISTMAT, [0, 0, 1, 1])


@pytest.mark.parametrize("share, n_axes", [(0.4, 1), (0.5, 2), (0.6, 2), (0.8, 3), (0.9, 3)])
def test_oml_principal_axes_hand_computed(share, n_axes):
    # OML's rule: n is the largest count with (sum of the first n-1 ratios) <= share; cumsum = [0.5, 0.8, 1.0]
    ratios = torch.tensor([0.5, 0.3, 0.2])
    assert oml_principal_axes(ratios, (share,)).tolist() == [n_axes]


def test_oml_principal_axes_several_shares_at_once():
    ratios = torch.tensor([0.5, 0.3, 0.2])
    assert oml_principal_axes(ratios, (0.4, 0.5, 0.8)).tolist() == [1, 2, 3]
    # OML's own PCA on its documented example (4 unit vectors in 10-d: 4 equal axes) agrees with the shim
    pca = PCA(torch.eye(4, 10))
    assert oml_principal_axes(pca.explained_variance_ratio, (0.5, 1)).tolist() == [2, 5]


def test_oml_principal_axes_missing_private_name(monkeypatch):
    monkeypatch.delattr(PCA, "calc_principal_axes_number")
    with pytest.raises(CompatError, match=r"^oml_principal_axes: open-metric-learning 4\.0\.\S+ has no "
                                          r"PCA\.calc_principal_axes_number"):
        oml_principal_axes(torch.tensor([0.5, 0.3, 0.2]), (0.5,))


def test_oml_principal_axes_when_the_method_reads_other_state(monkeypatch):
    # a newer OML whose method needs state the constructor sets: the shim says so instead of a silent NaN
    monkeypatch.setattr(PCA, "calc_principal_axes_number", lambda self, v: self.components[: len(v)])
    with pytest.raises(CompatError, match=r"^oml_principal_axes: .*reading only explained_variance_ratio"):
        oml_principal_axes(torch.tensor([0.5, 0.3, 0.2]), (0.5,))
