"""Start-up and usage-error latency of the entry points, this checkout against another commit, side by side.

    .venv/bin/python bench/bench_startup.py [--base c84afc3] [--repeats 3] [--update-docs docs/benchmarks.md]

The other commit is checked out in a temporary git worktree and run with the same Python (`PYTHONPATH` puts its
package first). Cases, each timed as a user sees it (process start to exit), alternating the two checkouts:
`scripts/train.py --help`, a misspelt override (`criterionn=arcface`), a missing mandatory value (`scripts/train.py`
without `dataset.root`), and a missing dataset folder. For the error cases it also records what the user is left
with: stderr lines, whether a traceback was printed, and whether a run folder or an MLflow run was left behind.
"""
from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import cpu_model  # noqa: E402
from metriclab.core.atomic import replace_markdown_section  # noqa: E402

CASES = {
    "--help": ["scripts/train.py", "--help"],
    "misspelt override": ["scripts/train.py", "criterionn=arcface"],
    "missing mandatory value": ["scripts/train.py"],
    "missing dataset folder": ["scripts/train.py", "dataset.root=/nonexistent/data"],
}


def run_case(repo: Path, args: list[str], outputs: Path) -> dict:
    """Run one case in `repo` with its outputs in `outputs` (fresh, empty); time it and inspect what it left."""
    env = {**os.environ, "PYTHONPATH": str(repo), "HYDRA_FULL_ERROR": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    extra = [] if "--help" in args else [f"paths.outputs_dir={outputs}"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args, *extra], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    run_dirs = [p for p in (outputs / "train").glob("*") if p.is_dir()] if (outputs / "train").is_dir() else []
    runs = 0
    db = outputs / "mlflow.db"
    if db.is_file():
        with sqlite3.connect(db) as con:
            try:
                runs = con.execute("select count(*) from runs").fetchone()[0]
            except sqlite3.OperationalError:  # the store was created but has no tables yet
                runs = 0
    return {"seconds": seconds, "rc": proc.returncode, "stderr_lines": len(proc.stderr.strip().splitlines()),
            "traceback": "Traceback" in proc.stderr, "run_dirs": len(run_dirs), "mlflow_runs": runs,
            "last_line": (proc.stderr.strip().splitlines() or [""])[-1][:160]}


def measure(checkouts: dict[str, Path], repeats: int) -> dict[tuple[str, str], list[dict]]:
    results: dict[tuple[str, str], list[dict]] = {}
    for case, args in CASES.items():
        for r in range(repeats):
            names = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))  # alternate who goes first
            for name in names:
                with tempfile.TemporaryDirectory() as tmp:
                    results.setdefault((case, name), []).append(run_case(checkouts[name], args, Path(tmp)))
    return results


def seconds_range(rows: list[dict]) -> str:
    s = sorted(r["seconds"] for r in rows)
    return f"{s[0]:.2f}–{s[-1]:.2f} s (median {statistics.median(s):.2f})"


def report(results: dict, checkouts: dict[str, Path], repeats: int, load_before, load_after, when: str) -> str:
    lines = [
        f"Measured {when} on {cpu_model()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}; "
        f"{repeats} runs per case and checkout, alternating; load average (1/5/15 min) before "
        f"{' / '.join(f'{x:.2f}' for x in load_before)}, after {' / '.join(f'{x:.2f}' for x in load_after)}. "
        f"Command: `.venv/bin/python bench/bench_startup.py --base {checkouts['before'].name}`.",
        "",
        "| case | checkout | wall time, range | exit code | stderr lines | traceback | run folders left | "
        "MLflow runs left | last stderr line |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        for name in checkouts:
            rows = results[(case, name)]
            last = rows[-1]
            lines.append(f"| {case} | {name} | {seconds_range(rows)} | {last['rc']} | {last['stderr_lines']} | "
                         f"{'yes' if last['traceback'] else 'no'} | {last['run_dirs']} | {last['mlflow_runs']} | "
                         f"`{last['last_line'].replace('|', '/')}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="c84afc3", help="the commit to compare with (default: before the layering)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--update-docs", type=Path, help="rewrite the '## Start-up' section of this markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / args.base
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            checkouts = {"before": base, "after": REPO}
            load_before = os.getloadavg()
            when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            results = measure(checkouts, args.repeats)
            text = report(results, checkouts, args.repeats, load_before, os.getloadavg(), when)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    print(text)
    if args.update_docs:
        update_docs(args.update_docs, text)


INTRO = """What a user waits for before the first word from an entry point, and what a usage error leaves behind,
produced by `bench/bench_startup.py`: this checkout ("after") against the commit before the layering ("before"), side by
side in one run. Entry points compose and check the config, and name the file or key at fault, before the heavy
stack (torch, Lightning, MLflow) is imported; a usage error found then opens no MLflow run and leaves no run folder.
What the entry point imports before the checks (`metriclab.jobs.entry`) takes ~0.25 s; a job module
(`metriclab.jobs.validate`: torch, torchvision, OML, MLflow) still takes ~9 s here, but only once the config passed."""


def update_docs(path: Path, table: str) -> None:
    replace_markdown_section(path, "## Start-up", INTRO + "\n\n" + table)


if __name__ == "__main__":
    main()
