"""Progress bars: drawn on a terminal (or when forced), silent otherwise, and never change what is computed."""
import io
import sys

import numpy as np
import pytest
import torch

from metriclab.core.progress import PROGRESS_ENV, progress, progress_enabled
from metriclab.inference.embed import embed_dataset
from metriclab.inference.search_index import IndexSpec, build_index


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class TensorItems(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"input_tensors": self.x[i]}


def test_quiet_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert not progress_enabled()  # pytest captures stderr: not a terminal
    assert list(progress(range(5), "counting")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_drawn_on_a_terminal(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_enabled()
    assert list(progress(range(4), "counting", unit="block")) == [0, 1, 2, 3]
    drawn = terminal.getvalue()
    assert "counting" in drawn and "0/4" in drawn and "block" in drawn  # tqdm redraws at most every 0.1 s


@pytest.mark.parametrize("value, tty, expected", [("0", True, False), ("1", False, True)])
def test_env_switch_wins(monkeypatch, value, tty, expected):
    stream = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv(PROGRESS_ENV, value)
    assert progress_enabled() is expected
    list(progress(range(3), "counting"))
    assert ("counting" in stream.getvalue()) is expected


def test_embedding_shows_a_bar_and_gives_the_same_numbers(monkeypatch):
    model = torch.nn.Linear(3, 2)
    quiet, ids, failed = embed_dataset(model, TensorItems(10), batch_size=4)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv(PROGRESS_ENV, "1")
    shown, ids2, _ = embed_dataset(model, TensorItems(10), batch_size=4, desc="embedding gallery")
    assert "embedding gallery" in terminal.getvalue() and "/3 " in terminal.getvalue()  # ceil(10 / 4) batches
    np.testing.assert_array_equal(quiet, shown)
    assert ids == ids2 == list(range(10)) and failed == []


def test_index_built_in_chunks_equals_one_add(monkeypatch):
    import faiss

    rng = np.random.default_rng(0)
    data = rng.normal(size=(40000, 8)).astype(np.float32)  # > one 16,384-row chunk: three adds
    monkeypatch.setenv(PROGRESS_ENV, "1")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    index = build_index(data, IndexSpec(kind="flat"))
    assert "/3 " in terminal.getvalue()  # three chunks
    reference = faiss.IndexFlat(8, faiss.METRIC_L2)
    reference.add(data)
    queries = data[:50] + 0.01
    d1, i1 = index.search(queries, 5)
    d2, i2 = reference.search(queries, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
