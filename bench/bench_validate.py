"""Benchmark of validate end to end at Market-1501 size: the t-SNE picture (old settings vs new) and validate's
stages beside the metric engine.

Q=3,368 queries, G=19,732 gallery items, D=512 float32 embeddings clustered by 751 identities (noise around a
centre per identity, so the metrics and the picture have structure), sequences "<pid>_c<cam>" over 6 cameras. The
dataset is a CSV whose 23,100 image paths are hard links to one small PNG (the worst-query grid reads ~40 of them),
and validate(cfg) runs on `embeddings=<npz>` with its MLflow store in a temporary folder, so no model is involved.
Everything runs in one process after a warm-up pass (imports, the store's creation), so start-up is not counted.

    python bench/bench_validate.py                      # print
    python bench/bench_validate.py --repeats 3 --update-docs docs/benchmarks.md
    python bench/bench_validate.py --profile            # cProfile of one validate(tsne=false), top 25 by cumtime

Targets (issue 15): the t-SNE of its sample (2,000 points) <= 10 s; validate's time beyond the engine <= 2 s.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pandas as pd
import torch
from machine import cpu_model  # noqa: E402  (bench/machine.py, beside this script)
from PIL import Image

from metriclab.core.atomic import replace_markdown_section

SECTION = "## Validate end to end"
Q, G, D, IDS, CAMS = 3368, 19732, 512, 751, 6


def make_dataset(tmp: Path, seed: int = 0) -> Path:
    """The CSV (+ hard-linked images) and the embeddings .npz of a Market-size validation split; returns the npz."""
    rng = np.random.default_rng(seed)
    n = Q + G
    labels = np.concatenate([rng.integers(0, IDS, Q), rng.integers(0, IDS, G)])
    cams = rng.integers(1, CAMS + 1, n)
    paths = [f"val/{i:05d}.png" for i in range(n)]
    (tmp / "data" / "val").mkdir(parents=True)
    one = tmp / "data" / "one.png"
    Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(one)
    for p in paths:
        os.link(one, tmp / "data" / p)
    pd.DataFrame({"label": labels, "path": paths, "split": "validation", "is_query": np.arange(n) < Q,
                  "is_gallery": np.arange(n) >= Q, "sequence": [f"{lab}_c{c}" for lab, c in zip(labels, cams)],
                  }).to_csv(tmp / "data" / "dataset.csv", index=False)
    centres = rng.normal(size=(IDS, D)).astype(np.float32)
    emb = centres[labels] + 0.8 * rng.normal(size=(n, D)).astype(np.float32)
    np.savez(tmp / "emb.npz", embeddings=emb.astype(np.float32), paths=np.array(paths))
    return tmp / "emb.npz"


def compose(tmp: Path, run: str, tsne: bool):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import metriclab.core.config  # noqa: F401  (repo_root resolver)
    from metriclab.core.paths import CONFIGS_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return hydra_compose("validate", [f"paths.outputs_dir={tmp}/outputs", f"paths.run_dir={tmp}/runs/{run}",
                                          f"dataset.root={tmp}/data", f"embeddings={tmp}/emb.npz",
                                          f"evaluation.tsne={str(tsne).lower()}"])


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stage_times(tmp: Path, cfg) -> Dict[str, float]:
    """validate's steps one by one, as validate(cfg) calls them (without the tracker)."""
    from sklearn.manifold import trustworthiness

    from metriclab.core.config import build
    from metriclab.evaluation.pictures import save_tsne, save_worst_queries, tsne_coordinates
    from metriclab.evaluation.validation import evaluate_validation
    from metriclab.jobs.validate import embed_validation_rows, read_inputs

    out: Dict[str, float] = {}
    evaluation = build(cfg.evaluation, "evaluation")
    t = time.perf_counter()
    inputs = read_inputs(cfg)
    out["read the CSV + check the rows"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = embed_validation_rows(cfg, inputs)[0]
    out["load + reorder the .npz"] = time.perf_counter() - t
    t = time.perf_counter()
    report = evaluate_validation(emb, inputs.data, evaluation)
    out["engine (evaluate_validation)"] = time.perf_counter() - t
    out["worst-query grid + CSV"] = timed(lambda: save_worst_queries(report, inputs.data, emb, tmp / "grid",
                                                                     evaluation))
    n = int(evaluation.tsne_max_points)
    x = emb[np.sort(np.random.default_rng(0).choice(len(emb), n, False))].numpy()
    layouts = {}
    out[f"t-SNE before (sklearn default: D={D}, 1000 steps, angle 0.5)"] = timed(
        lambda: layouts.update(before=tsne_coordinates(x, pca_dims=None, max_iter=1000, angle=0.5)))
    out["t-SNE after (PCA to 50, 500 steps, angle 0.8)"] = timed(lambda: layouts.update(after=tsne_coordinates(x)))
    # how well each layout keeps the 10 nearest neighbours of the 512-D points (1 = all kept): the picture's worth
    out.update({f"trustworthiness {k}": trustworthiness(x, v, n_neighbors=10) for k, v in layouts.items()})
    out["t-SNE plot after (sample + t-SNE + figure)"] = timed(
        lambda: save_tsne(emb, inputs.data.labels, tmp / "tsne.png", n))
    return out


def end_to_end(tmp: Path, rep: int) -> Dict[str, float]:
    from metriclab.jobs.validate import validate

    return {"validate(cfg), t-SNE off": timed(lambda: validate(compose(tmp, f"off{rep}", False))),
            "validate(cfg), t-SNE on": timed(lambda: validate(compose(tmp, f"on{rep}", True)))}


def fmt(values: List[float]) -> str:
    return f"{min(values):.2f}" if max(values) - min(values) < 0.005 else f"{min(values):.2f}–{max(values):.2f}"


def report(runs: List[Dict[str, float]], repeats: int) -> str:
    rows = ["| stage | seconds (min–max) |", "|---|---|"]
    rows += [f"| {k} | {fmt([r[k] for r in runs])} |" for k in runs[0] if not k.startswith("trust")]
    trust = ", ".join(f"{k.split()[-1]} {fmt([r[k] for r in runs])}" for k in runs[0] if k.startswith("trust"))
    # the stages beside the engine, summed within a repeat: end to end minus an engine timed in another pass is
    # swamped by the machine's load on a shared box
    beside = ("read the CSV + check the rows", "load + reorder the .npz", "worst-query grid + CSV")
    overhead = [sum(r[k] for k in beside) for r in runs]
    load = os.getloadavg()
    head = (f"`bench/bench_validate.py` on {dt.date.today().isoformat()}: {cpu_model()}, {os.cpu_count()} cores, "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end, Python "
            f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
            f"{repeats} repeats after a warm-up pass, ranges over the repeats. Synthetic Market size (Q={Q:,}, "
            f"G={G:,}, D={D}, {IDS} identities, {CAMS} cameras), `embeddings=<npz>`, so no model runs; start-up "
            "(imports, creating the MLflow store) is in the warm-up, not here.")
    return f"""{head}

{chr(10).join(rows)}

validate's stages beside the engine (t-SNE off: CSV + row checks, .npz, grid): {fmt(overhead)} s (target <= 2 s).
The t-SNE runs on its sample of `evaluation.tsne_max_points` (2,000) rows; "before" is the old call (sklearn's
defaults on all 512 dimensions), "after" reduces to 50 principal components and runs 500 steps at Barnes-Hut angle
0.8 (target <= 10 s). Trustworthiness of the layouts (how many of each point's 10 nearest 512-D neighbours stay
near it, 1 = all): {trust}.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--update-docs", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_dataset(tmp)
        if args.profile:
            from metriclab.jobs.validate import validate

            validate(compose(tmp, "warm-up", False))  # imports, the store, the first-call costs
            prof = cProfile.Profile()
            prof.runcall(validate, compose(tmp, "profile", False))
            pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats("metriclab", 40)
            return
        end_to_end(tmp, -1)  # warm-up: imports, the store, the first-call costs
        runs = []
        for rep in range(args.repeats):
            r = stage_times(tmp, compose(tmp, "stages", False))
            r.update(end_to_end(tmp, rep))
            print(rep, {k: round(v, 2) for k, v in r.items()}, flush=True)
            runs.append(r)
    text = report(runs, args.repeats)
    print(text)
    if args.update_docs:
        replace_markdown_section(args.update_docs, SECTION, text)


if __name__ == "__main__":
    main()
