"""Bad data is found before work starts, and named: every CSV row's image is checked up front (exists, under the
root), repeated rows are warned about, an unreadable image names its file and CSV line when read (or a blank one
stands in, counted), a bad embeddings array is one clear line, and Ctrl-C ends an entry point with one line."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metriclab.core.errors import ConfigError
from metriclab.core.paths import REPO_ROOT
from metriclab.data.contract import read_dataset_csv
from metriclab.data.datasets import build_train_data, build_validation_data
from metriclab.data.embeddings_file import FLOAT32_MAX, check_embeddings_array, read_npz_array
from tests.helpers import ENV, write_tiny_dataset

#: 7 classes x 10 images = 70 rows: more than the 50 rows the reader used to spot-check
PER_CLASS = 10


@pytest.fixture
def big_tiny(tmp_path) -> tuple[Path, pd.DataFrame]:
    root = tmp_path / "data"
    return root, write_tiny_dataset(root, per_class=PER_CLASS)


def test_missing_image_at_a_late_line_is_named_before_any_work(big_tiny):
    root, df = big_tiny
    late = 60  # CSV line 62: past the old 50-row spot check
    (root / df.path[late]).unlink()
    with pytest.raises(ConfigError) as e:
        read_dataset_csv(root)
    assert str(e.value) == (f"{root / 'dataset.csv'}: row {late + 2} (path={df.path[late]}): image "
                            f"{root / df.path[late]} does not exist (1 of 70 rows' images are missing): fix or "
                            f"remove the rows, or point `dataset.root` at the folder the CSV paths are relative to")


@pytest.mark.parametrize("outside", ["../outside.png", "train/../../outside.png", "ABSOLUTE"])
def test_path_outside_the_root_is_refused_unless_allowed(big_tiny, outside):
    root, df = big_tiny
    image = root.parent / "outside.png"
    image.write_bytes((root / df.path[0]).read_bytes())  # a real image, so only its place is wrong
    outside = str(image) if outside == "ABSOLUTE" else outside
    df.loc[55, "path"] = outside
    df.to_csv(root / "dataset.csv", index=False)
    with pytest.raises(ConfigError, match=rf"row 57 \(path={outside}\) points outside dataset.root={root} \(1 "
                                          rf"row\(s\) do\): keep images under the root, or set "
                                          rf"`dataset.allow_outside_root=true`"):
        read_dataset_csv(root)
    read = read_dataset_csv(root, allow_outside_root=True)
    assert read.path[55] == outside and len(read) == 70


def test_a_path_inside_the_root_that_mentions_dotdot_is_accepted(big_tiny):
    root, df = big_tiny
    df.loc[3, "path"] = f"validation/../{df.path[3]}"  # normalises to a path under the root
    df.to_csv(root / "dataset.csv", index=False)
    assert read_dataset_csv(root).path[3] == df.path[3]


def test_repeated_rows_in_a_split_are_warned_about(big_tiny, caplog):
    root, df = big_tiny
    df = pd.concat([df, df.iloc[[2, 5]], df.iloc[[65]]], ignore_index=True)  # two train repeats, one validation
    df.loc[72, "is_query"], df.loc[72, "is_gallery"] = False, True  # allowed as flags, still the same image twice
    df.loc[65, "is_gallery"] = False
    df.to_csv(root / "dataset.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="metriclab.data.contract"):
        read_dataset_csv(root)
    messages = [r.getMessage() for r in caplog.records if r.name == "metriclab.data.contract"]
    csv = root / "dataset.csv"
    assert messages == [
        f"{csv}: 2 row(s) of split=train repeat an earlier row's path (rows 72, 73); each copy is a separate image "
        f"to training and metrics",
        f"{csv}: 1 row(s) of split=validation repeat an earlier row's path (rows 74); each copy is a separate image "
        f"to training and metrics"]


def test_no_warning_without_repeats(big_tiny, caplog):
    root, _ = big_tiny
    with caplog.at_level(logging.WARNING, logger="metriclab.data.contract"):
        read_dataset_csv(root)
    assert not [r for r in caplog.records if r.name == "metriclab.data.contract"]


def corrupt(root: Path, df: pd.DataFrame, row: int) -> Path:
    path = root / df.path[row]
    path.write_bytes(b"not a png at all")  # exists (passes the up-front check), cannot be decoded
    return path


@pytest.mark.parametrize("split, row", [("train", 35), ("validation", 62)])
def test_corrupt_image_at_a_late_line_names_file_and_line_when_read(big_tiny, split, row):
    root, df = big_tiny
    path = corrupt(root, df, row)
    read = read_dataset_csv(root)  # the file exists: found only when read
    build = build_train_data if split == "train" else build_validation_data
    data = build(read, root, None)
    item = row - int(np.flatnonzero(read.split == split)[0])
    assert float(data.dataset[item - 1]["input_tensors"].abs().sum()) > 0  # its neighbours read fine
    with pytest.raises(ConfigError) as e:
        data.dataset[item]
    assert str(e.value) == (f"{root / 'dataset.csv'}: row {row + 2} (path={df.path[row]}): image {path} cannot be "
                            f"read (not a decodable image): replace the file or remove the row, or set "
                            f"`dataset.on_bad_image=skip`")


def test_corrupt_image_read_by_a_loader_worker_keeps_the_message(big_tiny):
    """Training reads in DataLoader workers: torch re-raises the worker's ConfigError with its traceback; the
    entry point's one line is our message."""
    from torch.utils.data import DataLoader

    from metriclab.jobs.entry import one_line

    root, df = big_tiny
    corrupt(root, df, 35)
    data = build_train_data(read_dataset_csv(root), root, None)
    with pytest.raises(ConfigError) as e:
        list(DataLoader(data.dataset, batch_size=8, num_workers=1))
    assert one_line(e.value) == (f"{root / 'dataset.csv'}: row 37 (path={df.path[35]}): image {root / df.path[35]} "
                                 f"cannot be read (not a decodable image): replace the file or remove the "
                                 f"row, or set `dataset.on_bad_image=skip`")


@pytest.mark.parametrize("transforms", [None, "torchvision"])
def test_skip_puts_a_blank_image_in_place_and_counts_it(big_tiny, caplog, transforms):
    root, df = big_tiny
    corrupt(root, df, 35)
    if transforms == "torchvision":
        import torchvision.transforms as T

        transforms = T.Compose([T.Resize((32, 32)), T.ToTensor()])
    data = build_train_data(read_dataset_csv(root), root, transforms, on_bad_image="skip")
    good = data.dataset[34]
    with caplog.at_level(logging.WARNING, logger="metriclab.data.datasets"):
        item = data.dataset[35]
        data.dataset[35]
    assert item["input_tensors"].shape == good["input_tensors"].shape
    assert item["idx"] == 35 and item["labels"] == data.labels[35] == 3 and item["category"] == "high"
    assert data.dataset.skipped == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "metriclab.data.datasets"]
    assert messages[-1] == (f"{root / 'dataset.csv'}: row 37 (path={df.path[35]}): image {root / df.path[35]} cannot "
                            f"be read (not a decodable image): a blank image stands in for it "
                            f"(dataset.on_bad_image=skip; 2 skipped so far in this process)")


def test_unknown_on_bad_image_is_refused(big_tiny):
    root, _ = big_tiny
    with pytest.raises(ConfigError, match=r"`dataset.on_bad_image=drop` is not supported"):
        build_train_data(read_dataset_csv(root), root, None, on_bad_image="drop")


@pytest.mark.parametrize("array, message", [
    (np.array([[1.0, 2.0]], dtype=object), "`embeddings` holds Python objects (dtype object)"),
    (np.array([["1.0", "2.0"]]), "`embeddings` holds text or raw bytes (dtype <U3)"),
    (np.array([[b"1", b"2"]]), "`embeddings` holds text or raw bytes (dtype |S1)"),
    (np.array([[True, False]]), "`embeddings` is boolean, not embeddings"),
    (np.array([[1 + 2j, 0j]]), "`embeddings` has dtype complex128"),
    (np.array([[1.0, 1e39]]), "`embeddings` has a value of magnitude 1e+39, beyond float32's 3.4e+38; rescale"),
    (np.array([[1.0, -1e300]]), "`embeddings` has a value of magnitude 1e+300, beyond float32's 3.4e+38"),
    (np.array([[1.0, np.nan]]), "`embeddings` contains NaN or inf"),
])
def test_bad_embeddings_array_is_one_clear_line(array, message):
    with pytest.raises(ConfigError) as e:
        check_embeddings_array(array, "emb.npz")
    assert str(e.value).startswith(f"embeddings=emb.npz: {message}") and "\n" not in str(e.value)


def test_good_embeddings_arrays_come_back_as_float32_unchanged():
    for array in (np.ones((2, 3), np.float16), np.full((2, 3), 1.5), np.arange(6).reshape(2, 3),
                  np.array([[FLOAT32_MAX, -FLOAT32_MAX]], dtype=np.float64)):
        out = check_embeddings_array(array, "emb.npz")
        assert out.dtype == np.float32 and np.array_equal(out, array.astype(np.float32)) and np.isfinite(out).all()


def test_object_array_in_an_npz_is_one_clear_line(tmp_path):
    path = tmp_path / "emb.npz"
    np.savez(path, embeddings=np.array([[1.0], ["x"]], dtype=object), paths=np.array(["a", "b"]))
    with np.load(path, allow_pickle=False) as npz:
        with pytest.raises(ConfigError, match=rf"^embeddings={path}: array `embeddings` holds Python objects "
                                              rf"\(dtype object\); save it as a plain numeric array$"):
            read_npz_array(npz, "embeddings", path)
        assert list(read_npz_array(npz, "paths", path)) == ["a", "b"]


SLEEPER = """
import sys, time
from metriclab.jobs import entry

def main():
    print("ready", flush=True)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        if {lightning}:  # what Lightning does with Ctrl-C during fit/validate
            sys.exit(1)
        raise

entry.launch(main)
"""


@pytest.mark.parametrize("lightning", [False, True])
def test_ctrl_c_exits_130_with_one_line(tmp_path, lightning):
    script = tmp_path / "sleeper.py"
    script.write_text(textwrap.dedent(SLEEPER.format(lightning=lightning)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == "interrupted\n" and "Traceback" not in out + err


def test_ctrl_c_during_training_exits_130_with_the_run_killed(tmp_path, tiny_dataset):
    from mlflow.tracking import MlflowClient

    from tests.helpers import cli_overrides

    proc = subprocess.Popen([sys.executable, "scripts/train.py", *cli_overrides(tmp_path, tiny_dataset),
                             "trainer.max_epochs=500"], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((tmp_path / "outputs" / "train").glob("*/metrics.json")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # inside Lightning's fit: it turns Ctrl-C into sys.exit(1)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in out + err
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_training_on_a_corrupt_late_image_stops_with_one_line_naming_it(tmp_path):
    from tests.helpers import cli_overrides

    root = tmp_path / "data"
    df = write_tiny_dataset(root, per_class=PER_CLASS)
    corrupt(root, df, 35)
    proc = subprocess.run([sys.executable, "scripts/train.py", *cli_overrides(tmp_path, root),
                           "trainer.max_epochs=1"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {root / 'dataset.csv'}: row 37 (path={df.path[35]}): image {root / df.path[35]} cannot be read (not "
        f"a decodable image): replace the file or remove the row, or set `dataset.on_bad_image=skip`")


def test_a_swallowed_ctrl_c_is_raised_again_at_the_next_training_step():
    # Python drops a KeyboardInterrupt raised inside a garbage-collection callback ("Exception ignored in ..."):
    # seen with SQLAlchemy's weakref callbacks, a training then ran on after Ctrl-C. The handler records every
    # Ctrl-C; the training callback raises it again at the next batch boundary.
    from metriclab.core import interrupt
    from metriclab.jobs.entry import SigintWatch
    from metriclab.training.callbacks import RaiseSwallowedInterrupt

    interrupt.clear()
    callback = RaiseSwallowedInterrupt()
    callback.on_train_batch_end(None, None, None, None, 0)  # nothing recorded: nothing raised
    watch = SigintWatch()
    with pytest.raises(KeyboardInterrupt):
        watch.handler(signal.SIGINT, None)  # what Python calls on Ctrl-C: records, then raises
    assert watch.received and interrupt.pending()
    try:
        for hook in (callback.on_train_batch_start, callback.on_train_batch_end, callback.on_validation_batch_end,
                     callback.on_train_epoch_end):
            with pytest.raises(KeyboardInterrupt):
                hook(None, None, None, None, 0)
    finally:
        interrupt.clear()
