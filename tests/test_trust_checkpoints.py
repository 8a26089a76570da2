"""Nothing half-written: a full disk or a kill during a checkpoint write leaves the old checkpoint whole and no
orphan (in the checkpoint folder or the system temp folder); a resume falls back to the previous last.ckpt."""
from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from metriclab.core.atomic import atomic_write
from metriclab.core.checkpoint import previous_path
from metriclab.core.errors import ConfigError
from metriclab.jobs.train import train
from metriclab.training.checkpoint_io import AtomicCheckpointIO, load_with_fallback
from tests.helpers import compose_cfg, fast_overrides, write_tiny_dataset

TRAIN_OVERRIDES = ["criterion=triplet_hard", "sampler=balance", "sampler.n_labels=4", "sampler.n_instances=3",
                   "trainer.max_epochs=2", "optimizer.lr=1e-3"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
    """The system temp folder, on another filesystem than tmp_path where one exists (/dev/shm): what makes a move
    from it a copy."""
    shm = Path("/dev/shm")
    on_other_fs = shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev
    folder = Path(tempfile.mkdtemp(dir=shm if on_other_fs else tmp_path, prefix="system-tmp-"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _target_name(f) -> str:
    return str(getattr(f, "name", f)) if not isinstance(f, io.BytesIO) else ""


def fail_writes_into(monkeypatch, folder: Path, when=lambda name: True, on_fail=None):
    """Writes of a checkpoint into `folder` (torch.save to a file there, or a copy into it) stop halfway: the disk
    is full (OSError ENOSPC), or `on_fail()` runs (a kill). In-memory saves are untouched."""
    real_save, real_copy = torch.save, shutil.copyfile

    def fail(write_half):
        write_half()
        if on_fail is not None:
            on_fail()
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(obj, f, *args, **kwargs):
        name = _target_name(f)
        if not name or Path(name).parent != folder or not when(name):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        fail(lambda: (f.write(buf.getvalue()[: len(buf.getvalue()) // 2]), f.flush()))

    def copyfile(src, dst, *args, **kwargs):
        if Path(dst).parent != folder or not when(str(dst)):
            return real_copy(src, dst, *args, **kwargs)
        data = Path(src).read_bytes()
        fail(lambda: Path(dst).write_bytes(data[: len(data) // 2]))

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "copyfile", copyfile)


def _epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def test_a_full_disk_during_a_write_keeps_the_old_checkpoint_and_leaves_no_orphan(tmp_path, system_tmp,
                                                                                  monkeypatch):
    folder = tmp_path / "checkpoints"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"epoch": 0, "w": torch.arange(1000.0)}, folder / "last.ckpt")
    before = (folder / "last.ckpt").read_bytes()
    fail_writes_into(monkeypatch, folder)
    with pytest.raises(OSError, match="No space left"):
        io_.save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, folder / "last.ckpt")
    assert (folder / "last.ckpt").read_bytes() == before and _epoch(folder / "last.ckpt") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert list(system_tmp.iterdir()) == []


def test_each_write_keeps_the_last_checkpoint_it_replaces(tmp_path):
    folder = tmp_path / "checkpoints"
    io_ = AtomicCheckpointIO()
    for epoch in range(3):
        io_.save_checkpoint({"epoch": epoch}, folder / "last.ckpt")
        io_.save_checkpoint({"epoch": epoch}, folder / "best.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt", "last.prev.ckpt"]
    assert (_epoch(folder / "last.ckpt"), _epoch(folder / "last.prev.ckpt"), _epoch(folder / "best.ckpt")) == (2, 1, 2)
    # a truncated last.ckpt is not kept: the previous (whole) one stays the fallback
    (folder / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:100])
    io_.save_checkpoint({"epoch": 3}, folder / "last.ckpt")
    assert (_epoch(folder / "last.ckpt"), _epoch(folder / "last.prev.ckpt")) == (3, 1)


def test_the_previous_file_is_copied_where_hard_links_are_refused(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_text("old")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"), keep_previous=previous_path(target))
    assert (target.read_text(), previous_path(target).read_text()) == ("new", "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]


KILLED_WRITER = """
import os, signal, sys, tempfile
from pathlib import Path
import pytest, torch
sys.path.insert(0, {repo!r})
from metriclab.training.checkpoint_io import AtomicCheckpointIO
from tests.test_trust_checkpoints import fail_writes_into
folder = Path({folder!r})
tempfile.tempdir = {system_tmp!r}
mp = pytest.MonkeyPatch()
fail_writes_into(mp, folder, on_fail=lambda: os.kill(os.getpid(), signal.SIGKILL))
AtomicCheckpointIO().save_checkpoint({{"epoch": 1, "w": torch.zeros(1000)}}, folder / "last.ckpt")
"""


def test_a_kill_during_a_write_keeps_the_old_checkpoint_and_the_next_write_removes_its_leftover(tmp_path,
                                                                                                 system_tmp):
    folder = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.arange(1000.0)}, folder / "last.ckpt")
    before = (folder / "last.ckpt").read_bytes()
    script = KILLED_WRITER.format(repo=str(REPO), folder=str(folder), system_tmp=str(system_tmp))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (folder / "last.ckpt").read_bytes() == before and _epoch(folder / "last.ckpt") == 0
    assert list(system_tmp.iterdir()) == []
    leftovers = [p.name for p in folder.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")  # a kill cannot clean up after itself
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    assert (_epoch(folder / "last.ckpt"), _epoch(folder / "last.prev.ckpt")) == (1, 0)


def test_load_with_fallback_names_both_files_when_neither_loads(tmp_path):
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"PK\x03\x04 truncated")
    previous_path(last).write_bytes(b"also broken")

    def load(path):
        raise ConfigError(f"{path} is not a checkpoint")

    with pytest.raises(ConfigError, match=r"last.ckpt is not a checkpoint; .*last.prev.ckpt is not a checkpoint"):
        load_with_fallback(last, load)
    previous_path(last).unlink()
    with pytest.raises(ConfigError, match=r"last.ckpt is not a checkpoint$"):
        load_with_fallback(last, load)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_tiny_dataset(root)
    return root


def test_a_training_whose_disk_fills_keeps_last_ckpt_whole_and_resumes(tmp_path, data_root, system_tmp,
                                                                       monkeypatch):
    folder = tmp_path / "run" / "checkpoints"
    # the second epoch's last.ckpt write meets a full disk
    fail_writes_into(monkeypatch, folder, when=lambda name: "last.ckpt" in name and (folder / "last.ckpt").exists())
    with pytest.raises(OSError, match="No space left"):
        train(compose_cfg("train", fast_overrides(tmp_path, data_root) + TRAIN_OVERRIDES))
    assert _epoch(folder / "last.ckpt") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert list(system_tmp.iterdir()) == []
    monkeypatch.undo()
    resumed = train(compose_cfg("train", fast_overrides(tmp_path, data_root) + TRAIN_OVERRIDES +
                                [f"resume={tmp_path / 'run'}"]))
    assert _epoch(Path(resumed["last_ckpt"])) == 1 and _epoch(folder / "last.prev.ckpt") == 0


def test_a_truncated_last_ckpt_resumes_from_the_previous_one_with_a_warning(tmp_path, data_root, caplog):
    first = train(compose_cfg("train", fast_overrides(tmp_path, data_root) + TRAIN_OVERRIDES))
    last = Path(first["last_ckpt"])
    assert (_epoch(last), _epoch(previous_path(last))) == (1, 0)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write killed before the atomic writer
    with caplog.at_level(logging.WARNING, logger="metriclab.training.checkpoint_io"):
        resumed = train(compose_cfg("train", fast_overrides(tmp_path, data_root) + TRAIN_OVERRIDES +
                                    ["trainer.max_epochs=3", f"resume={tmp_path / 'run'}"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint {last} does not load" in w and f"previous checkpoint {previous_path(last)}" in w
               for w in warnings), warnings
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    # epoch 0's checkpoint resumed: epochs 1 and 2 trained again; the truncated file was not kept as the previous
    assert (_epoch(last), _epoch(previous_path(last))) == (2, 1)
