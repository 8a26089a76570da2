"""onnxruntime vs PyTorch eager on CPU: images/s of the same extractor, exported the way scripts/export.py exports it.

    python bench/bench_onnx.py [--repeats 5] [--batch 32] [--no-write]

Two cases: a random-init ResNet18 extractor at 224x224 (the default input size) and at 32x32 (the digits demo's
size), batch 32. Each repeat times one batch per engine, round robin (engines and cases alike), after one warm-up;
the table quotes min-max over the repeats. Results go to docs/benchmarks.md ("ONNX Runtime vs PyTorch eager").
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_model  # noqa: E402
from metriclab.core.atomic import replace_markdown_section  # noqa: E402
from metriclab.core.paths import REPO_ROOT  # noqa: E402
from metriclab.inference.export import ExportedExtractor, export_graph  # noqa: E402
from metriclab.inference.onnx_model import open_session  # noqa: E402

HEADING = "## ONNX Runtime vs PyTorch eager (CPU)"
CASES = (("ResNet18 extractor, 224x224", 224), ("ResNet18 extractor, 32x32 (digits)", 32))


def resnet18() -> torch.nn.Module:
    from oml.models import ResnetExtractor

    torch.manual_seed(0)
    return ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=False).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    model = ExportedExtractor(resnet18()).eval()
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in CASES:
            x = torch.rand(args.batch, 3, size, size)
            path = export_graph(model, x[:2], Path(tmp) / f"{size}.onnx", 18)
            session = open_session(path, ["CPUExecutionProvider"], threads)
            feed = {"images": x.numpy()}
            with torch.inference_mode():
                diff = float(np.abs(session.run(None, feed)[0] - model(x).numpy()).max())

            def eager(x=x):
                with torch.inference_mode():
                    model(x)

            engines[name] = {"PyTorch eager": eager, "onnxruntime": lambda s=session, f=feed: s.run(None, f),
                             "diff": diff}
        for runs in engines.values():  # warm-up
            runs["PyTorch eager"]()
            runs["onnxruntime"]()
        times = {(c, e): [] for c in engines for e in ("PyTorch eager", "onnxruntime")}
        for _ in range(args.repeats):
            for case, runs in engines.items():
                for engine in ("PyTorch eager", "onnxruntime"):
                    times[(case, engine)].append(args.batch / timed(runs[engine]))
    load_after = os.getloadavg()
    rows = []
    for case in engines:
        eager, ort_ = (sorted(times[(case, e)]) for e in ("PyTorch eager", "onnxruntime"))
        ratio = np.median(ort_) / np.median(eager)
        rows.append(f"| {case} | {eager[0]:.1f}–{eager[-1]:.1f} | {ort_[0]:.1f}–{ort_[-1]:.1f} | {ratio:.2f}× | "
                    f"{engines[case]['diff']:.1e} |")
    import onnxruntime

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (f"Measured {now} on {cpu_model()}, {os.cpu_count()} cores (shared), torch {torch.__version__} "
            f"({threads} threads), onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, {threads} intra-op "
            f"threads); load average (1/5/15 min) before {' / '.join(f'{v:.2f}' for v in load_before)}, after "
            f"{' / '.join(f'{v:.2f}' for v in load_after)}.\n"
            f"Reproduce: `python bench/bench_onnx.py` (random init, batch {args.batch}, {args.repeats} repeats round "
            f"robin after one warm-up; the graph is exported as scripts/export.py does: torch.export-based, opset "
            f"18, dynamic batch).\n\n"
            f"| model, input | PyTorch eager images/s | onnxruntime images/s | median ratio | max abs diff |\n"
            f"|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if not args.no_write:
        replace_markdown_section(REPO_ROOT / "docs" / "benchmarks.md", HEADING, body)


if __name__ == "__main__":
    main()
