"""bench/gpu_check.py: the one line and exit 0 without a GPU, and the `--device cpu` smoke run of the same pipeline
(generated Market-1501 tree, converter, market_bot training, validate, ONNX export with parity, one MLflow store)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import ENV

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
NO_GPU = re.compile(r"^gpu-check: no CUDA GPU visible to torch \(torch \S+\): nothing to check here$")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def table_value(stdout: str, row: str) -> str:
    """The value cell of the markdown row whose first cell starts with `row`."""
    match = re.search(rf"^\| {re.escape(row)}[^|]* \| ([^|]+) \|$", stdout, re.MULTILINE)
    assert match, f"no row {row!r} in:\n{stdout}"
    return match.group(1).strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the script would run the real check")
def test_without_a_gpu_prints_one_line_and_exits_0():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert NO_GPU.match(out.stdout.strip()), out.stdout
    assert out.stdout.count("\n") == 1


def test_without_a_gpu_writes_nothing(monkeypatch, tmp_path, capsys):
    """Whatever this machine has: torch seeing no GPU means the line, exit 0 and no --out folder."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_script().main(["--out", str(tmp_path / "out")]) == 0
    assert NO_GPU.match(capsys.readouterr().out.strip())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cpu_smoke_run_end_to_end(tmp_path):
    out_dir = tmp_path / "out"
    default_out = REPO / "outputs" / "gpu_check"
    existed = default_out.exists()
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "4", "--ids", "8", "--out", str(out_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "train: 4 steps" in out.stdout
    assert float(table_value(out.stdout, "training images/s")) > 0
    assert float(table_value(out.stdout, "ONNX parity max abs diff")) <= 1e-4
    assert float(table_value(out.stdout, "ONNX parity min cosine")) >= 0.9999
    assert re.search(r"^\| validation mAP, untrained → trained \| \d\.\d{4} → \d\.\d{4} \|$", out.stdout, re.MULTILINE)
    assert (out_dir / "export" / "model.onnx").is_file() and (out_dir / "export" / "model.json").is_file()
    assert (out_dir / "gpu_check.md").read_text() in out.stdout
    client = MlflowClient(f"sqlite:///{out_dir}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted((r.data.tags.get("task"), r.info.status) for r in runs) == [("train", "FINISHED"),
                                                                              ("validate", "FINISHED")]
    assert default_out.exists() == existed  # everything went under --out


def test_out_must_be_new_or_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "keep.txt").write_text("x")
    assert load_script().main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
