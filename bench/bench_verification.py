"""Benchmark of the verification metrics (FNMR@FMR, thresholds, EER) at Market-1501 size, beside OML's way.

    python bench/bench_verification.py                                  # 3 runs of each case, round robin
    python bench/bench_verification.py --update-docs docs/benchmarks.md

Cases, each run in its own process (its extra peak RSS is its own: reset after the data is built):
- `ours`: `metriclab.evaluation.verification.verification_metrics` (two passes over query blocks, a histogram of
  the negatives, exact order statistics; never the Q x G matrix);
- `oml`: what OML's pipeline does for `fnmr@fmr`: the whole Q x G distance matrix (torch.cdist, float32), the
  positive and negative distances gathered with the same exclusions, `oml.functional.metrics.calc_fnmr_at_fmr`
  (a numpy quantile of all negatives); no EER, no thresholds;
- `engine`: `metriclab.evaluation.engine.evaluate_retrieval` (the ranking metrics) for scale: verification is on
  by default in validation, so its cost is read against this.

Data: Q=3,368 queries, G=19,732 gallery items, D=512, 750 identities (standard normal centres plus noise 2.5), 6
cameras; same-identity same-camera pairs excluded (the Market protocol), query ids distinct from gallery ids.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model, peak_rss_mb, reset_peak_rss  # noqa: E402  (bench/machine.py, beside this script)

from metriclab.core.atomic import replace_markdown_section

SECTION = "## Verification metrics (FNMR@FMR, EER)"
MARKET = dict(n_query=3368, n_gallery=19732, dim=512, n_ids=750, n_cams=6)
NOISE = 2.5  # same-identity and other-identity distances overlap: FNMR@FMR is far from 0 and 1
FMR_VALS = (0.1, 0.01, 0.001)
CASES = ("ours", "oml", "engine")


def make_sides(n_query: int, n_gallery: int, dim: int, n_ids: int, n_cams: int, seed: int = 0):
    from metriclab.evaluation.spec import RetrievalSide

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim)).astype(np.float32)
    q_lab, g_lab = rng.integers(0, n_ids, n_query), rng.integers(0, n_ids, n_gallery)
    q_cam, g_cam = rng.integers(0, n_cams, n_query), rng.integers(0, n_cams, n_gallery)
    q_emb = centres[q_lab] + NOISE * rng.normal(size=(n_query, dim)).astype(np.float32)
    g_emb = centres[g_lab] + NOISE * rng.normal(size=(n_gallery, dim)).astype(np.float32)
    q_seq = np.array([f"{lab}_c{c}" for lab, c in zip(q_lab, q_cam)], dtype=object)
    g_seq = np.array([f"{lab}_c{c}" for lab, c in zip(g_lab, g_cam)], dtype=object)
    query = RetrievalSide(torch.from_numpy(q_emb), q_lab, ids=np.arange(n_query), sequences=q_seq)
    gallery = RetrievalSide(torch.from_numpy(g_emb), g_lab, ids=np.arange(n_query, n_query + n_gallery),
                            sequences=g_seq)
    return query, gallery


def run_ours(query, gallery) -> dict:
    from metriclab.evaluation.verification import verification_metrics

    result = verification_metrics(query, gallery, "euclidean", FMR_VALS)
    return {k: float(v) for k, v in result.metrics.items()}


def run_oml(query, gallery) -> dict:
    from oml.functional.metrics import calc_fnmr_at_fmr

    dist = torch.cdist(query.embeddings.float(), gallery.embeddings.float())  # [Q, G] float32: what OML holds
    same = torch.from_numpy(np.asarray(query.labels)[:, None] == np.asarray(gallery.labels)[None, :])
    excluded = torch.from_numpy(np.asarray(query.sequences)[:, None] == np.asarray(gallery.sequences)[None, :])
    pos = dist[same & ~excluded].numpy()
    neg = dist[~same & ~excluded].numpy()
    fnmr = calc_fnmr_at_fmr(pos, neg, FMR_VALS)
    return {f"fnmr@fmr_{x:g}": float(v) for x, v in zip(FMR_VALS, fnmr)}


def run_engine(query, gallery) -> dict:
    from metriclab.evaluation.engine import evaluate_retrieval

    return {"mAP": float(evaluate_retrieval(query, gallery).metrics["mAP"])}


def run_case(case: str) -> dict:
    runner = {"ours": run_ours, "oml": run_oml, "engine": run_engine}[case]
    tiny = make_sides(40, 120, 8, 10, 3, seed=1)
    runner(*tiny)  # imports and first-call costs outside the clock and the RSS mark
    query, gallery = make_sides(**MARKET)
    base = reset_peak_rss()
    start = time.perf_counter()
    metrics = runner(query, gallery)
    wall = time.perf_counter() - start
    return {"case": case, "wall_s": wall, "extra_peak_rss_mb": peak_rss_mb() - base, "metrics": metrics,
            "threads": torch.get_num_threads()}


def spawn(case: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def span(values, digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    a, b = f"{lo:.{digits}f}", f"{hi:.{digits}f}"
    return a if a == b else f"{a}–{b}"


def summarise(runs: dict, load_before, load_after) -> str:
    size = MARKET
    ours, oml = runs["ours"][0]["metrics"], runs["oml"][0]["metrics"]
    lines = [
        f"Q={size['n_query']:,}, G={size['n_gallery']:,}, D={size['dim']}, {size['n_ids']} ids, {size['n_cams']} "
        f"cameras, clustered float32 (noise {NOISE}); torch threads {runs['ours'][0]['threads']}; load average "
        f"(1/5/15 min) before {' / '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' / '.join(f'{x:.2f}' for x in load_after)}. {len(runs['ours'])} runs per case, round robin, each in its "
        "own process.",
        "",
        "| case | wall time (s) | extra peak RSS (MB) |",
        "|---|---|---|",
    ]
    names = {"ours": "metriclab `verification_metrics` (FNMR@FMR ×3, thresholds, EER)",
             "oml": "OML's way: Q × G `cdist` + `calc_fnmr_at_fmr` (FNMR@FMR ×3 only)",
             "engine": "metriclab ranking engine (`evaluate_retrieval`), for scale"}
    for case in CASES:
        rows = runs[case]
        lines.append(f"| {names[case]} | {span([r['wall_s'] for r in rows])} | "
                     f"{span([r['extra_peak_rss_mb'] for r in rows], 0)} |")
    agree = ", ".join(f"fnmr@fmr_{x:g}: {ours[f'fnmr@fmr_{x:g}']:.6f} vs {oml[f'fnmr@fmr_{x:g}']:.6f}"
                      for x in FMR_VALS)
    lines += ["", f"Same numbers: {agree} (OML interpolates its threshold between two negatives and counts d ≥ t as a "
                  "non-match; they differ only where a positive falls between the two negatives around OML's "
                  f"quantile). Ours also gives eer {ours['eer']:.6f} at {ours['eer_threshold']:.4f}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (round robin)")
    parser.add_argument("--update-docs", type=Path, metavar="MD", help="write the results into this markdown file")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return 0
    load_before = os.getloadavg()
    started = dt.datetime.now().astimezone()
    runs: dict = {case: [] for case in CASES}
    for i in range(args.repeats):
        for case in CASES:
            runs[case].append(spawn(case))
            print(f"run {i + 1} {case}: {runs[case][-1]['wall_s']:.2f} s, "
                  f"{runs[case][-1]['extra_peak_rss_mb']:.0f} MB", flush=True)
    table = summarise(runs, load_before, os.getloadavg())
    header = (f"Measured {started:%Y-%m-%d %H:%M %Z} on {cpu_model()}, {os.cpu_count()} cores (shared), Python "
              f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}.\n"
              f"Reproduce: `python bench/bench_verification.py` (absolute times move with load).\n")
    print("\n" + header + "\n" + table)
    if args.update_docs:
        replace_markdown_section(args.update_docs, SECTION, header + "\n" + table)
        print(f"wrote section '{SECTION}' of {args.update_docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
