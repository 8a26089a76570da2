"""The run-comparison report: a table of the runs in an MLflow store and their validation curves.

    python scripts/report.py [--experiment NAME] [--tracking-uri URI] [--out outputs/report] [--metric mAP]

One row per run (config, dataset, model, loss, key metrics, epochs, duration), sorted by the best value of the
main metric over the run's epochs; the other metrics are read at that same epoch (the epoch best.ckpt keeps when
it monitors the main metric). Runs without any `val/` metric (explain jobs, runs that failed before validating)
are left out unless `--all-runs`. Written atomically: `report.md`, `report.html`, `report.csv`,
`compare_<metric>.png` (the main metric per epoch, every run) and `curves/<n>_<run>.png` (one per run).
"""
from __future__ import annotations

import datetime as dt
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# metriclab.core.atomic imports nothing heavy: `make report` starts without loading torch or Lightning.
from metriclab.core.atomic import atomic_savefig, write_csv_atomic, write_text_atomic  # noqa: E402
from metriclab.core.constants import DEFAULT_MLFLOW_URI  # noqa: E402
from metriclab.core.errors import ConfigError  # noqa: E402
from metriclab.core.paths import OUTPUTS_DIR  # noqa: E402
from metriclab.tracking.keys import default_tracking_uri, mlflow_metric_key  # noqa: E402

DEFAULT_METRICS = ("mAP", "cmc@1", "cmc@5", "precision@5", "map@5", "knn_accuracy@1")
TRAIN_LOSS = "train/loss"
#: Runs drawn on the comparison plot (the best ones): more lines than this are unreadable.
MAX_COMPARED = 12


def _val_key(metric: str) -> str:
    return f"val/{mlflow_metric_key(metric)}"


def _short(target: Optional[str]) -> str:
    return str(target).rsplit(".", 1)[-1] if target and target != "None" else ""


def loss_name(params: Dict[str, str]) -> str:
    """`TripletLossWithMiner(HardTripletsMiner)`, `ArcFaceLoss`, `ClassificationTripletLoss(SoftmaxLoss+...)`."""
    base = _short(params.get("criterion._target_"))
    if not base:
        return "-"
    parts = [_short(params.get(k)) for k in ("criterion.classification._target_", "criterion.miner._target_",
                                              "criterion.triplet.miner._target_")]
    parts = [p for p in parts if p]
    return f"{base}({'+'.join(parts)})" if parts else base


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


@dataclass
class RunSummary:
    run_id: str
    name: str
    experiment: str
    status: str
    task: str
    config: str
    dataset: str
    model: str
    loss: str
    epochs: Optional[int]
    duration_s: Optional[float]
    best_epoch: Optional[int]
    best_main: float
    last_main: float
    at_best: Dict[str, float]  # key metric -> value at best_epoch (else the last value)
    curves: Dict[str, List[tuple]]  # mlflow key -> [(step, value)] sorted


# ----------------------------------------------------------------------------------------------------------------------
# reading the store


def open_store(tracking_uri: str):
    """MlflowClient on an existing store (a missing sqlite file is an error, not a new empty store)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise ConfigError(f"no MLflow store at {db}: train or validate something first, or pass "
                              f"--tracking-uri (default: $MLFLOW_TRACKING_URI, else {DEFAULT_MLFLOW_URI})")
    return MlflowClient(tracking_uri)


def _experiments(client, names: Optional[Sequence[str]]):
    all_exps = client.search_experiments()
    if not names:
        return all_exps
    by_name = {e.name: e for e in all_exps}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"experiment(s) {missing} not in the store; it has {sorted(by_name)} "
                          f"(EXPERIMENT=<name> / --experiment <name>)")
    return [by_name[n] for n in names]


def _all_runs(client, experiment_ids: List[str]) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, max_results=1000, page_token=token, order_by=["start_time ASC"])
        runs += list(page)
        token = page.token
        if not token:
            return runs


def summarise_run(client, run, experiment_name: str, main_metric: str, metrics: Sequence[str]) -> RunSummary:
    data, info = run.data, run.info
    params, tags = dict(data.params), dict(data.tags)
    keys = {_val_key(m) for m in (main_metric, *metrics)} | {TRAIN_LOSS}
    curves = {}
    for key in sorted(keys & set(data.metrics)):
        history = client.get_metric_history(info.run_id, key)
        latest = {}
        for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
            latest[int(m.step)] = float(m.value)  # a resumed run may log a step twice: keep the later value
        curves[key] = sorted(latest.items())
    main_curve = curves.get(_val_key(main_metric), [])
    best_epoch, best_main, last_main = None, float("nan"), float("nan")
    finite = [(s, v) for s, v in main_curve if not math.isnan(v)]
    if finite:
        best_epoch, best_main = max(finite, key=lambda sv: (sv[1], -sv[0]))  # the earliest of equal bests
        last_main = main_curve[-1][1]
    at_best = {}
    for m in metrics:
        curve = dict(curves.get(_val_key(m), []))
        if best_epoch is not None and best_epoch in curve:
            at_best[m] = curve[best_epoch]
        elif curve:
            at_best[m] = curve[max(curve)]
        else:
            at_best[m] = float("nan")
    epochs = len(curves[TRAIN_LOSS]) if TRAIN_LOSS in curves else None
    end = info.end_time or (None if info.status != "RUNNING" else dt.datetime.now().timestamp() * 1000)
    duration = (end - info.start_time) / 1000 if end and info.start_time else None
    config = tags.get("config_name")
    return RunSummary(
        run_id=info.run_id, name=info.run_name or info.run_id, experiment=experiment_name, status=info.status,
        task=tags.get("task", "-"), config=config if config not in (None, "None", "unknown") else tags.get("task", "-"),
        dataset=tags.get("dataset", "-"), model=params.get("extractor.arch") or _short(params.get("extractor._target_"))
        or "-", loss=loss_name(params), epochs=epochs, duration_s=duration, best_epoch=best_epoch,
        best_main=best_main, last_main=last_main, at_best=at_best, curves=curves,
    )


def collect_runs(tracking_uri: str, experiments: Optional[Sequence[str]] = None, main_metric: str = "mAP",
                 metrics: Sequence[str] = DEFAULT_METRICS, all_runs: bool = False) -> List[RunSummary]:
    """Summaries of the store's runs, best main metric first (runs without it last, newest first among them)."""
    client = open_store(tracking_uri)
    metrics = [m for m in dict.fromkeys([main_metric, *metrics])]
    summaries = []
    for exp in _experiments(client, experiments):
        for run in _all_runs(client, [exp.experiment_id]):
            if not all_runs and not any(k.startswith("val/") for k in run.data.metrics):
                continue
            summaries.append(summarise_run(client, run, exp.name, main_metric, metrics))
    if not summaries:
        where = f"experiment(s) {list(experiments)}" if experiments else "the store"
        raise ConfigError(f"{where} ({tracking_uri}) holds no run with validation metrics"
                          f"{'' if all_runs else ' (--all-runs lists every run)'}")
    if all(math.isnan(s.best_main) for s in summaries):
        found = sorted({k[4:].replace("_at_", "@") for s in summaries for k in s.curves if k.startswith("val/")})
        raise ConfigError(f"no run has val/{main_metric}; choose --metric among {found}")
    summaries.sort(key=lambda s: (math.isnan(s.best_main), -s.best_main if not math.isnan(s.best_main) else 0,
                                  s.name))
    return summaries


# ----------------------------------------------------------------------------------------------------------------------
# writing


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def runs_table(summaries: Sequence[RunSummary], main_metric: str, metrics: Sequence[str]) -> pd.DataFrame:
    others = [m for m in metrics if m != main_metric]
    rows = []
    for rank, s in enumerate(summaries, start=1):
        row = {"#": rank, "run": s.name, "status": s.status, "task": s.task, "config": s.config,
               "dataset": s.dataset, "model": s.model, "loss": s.loss,
               f"best {main_metric}": _fmt(s.best_main),
               "best epoch": "-" if s.best_epoch is None else str(s.best_epoch)}
        row.update({m: _fmt(s.at_best.get(m)) for m in others})
        row.update({f"last {main_metric}": _fmt(s.last_main),
                    "epochs": "-" if s.epochs is None else str(s.epochs),
                    "duration": format_duration(s.duration_s), "run id": s.run_id})
        rows.append(row)
    return pd.DataFrame(rows)


def _markdown_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "run"


def plot_run_curves(s: RunSummary, metrics: Sequence[str], out_png: Path) -> None:
    """Validation metrics per epoch (left) and the train loss per epoch (right, when logged)."""
    has_loss = TRAIN_LOSS in s.curves
    fig, axes = plt.subplots(1, 2 if has_loss else 1, figsize=(10 if has_loss else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    for m in metrics:
        curve = s.curves.get(_val_key(m))
        if curve:
            steps, values = zip(*curve)
            ax.plot(steps, values, marker="o", markersize=3, label=m)
    if s.best_epoch is not None:
        ax.axvline(s.best_epoch, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if has_loss:
        steps, values = zip(*s.curves[TRAIN_LOSS])
        axes[0][1].plot(steps, values, marker="o", markersize=3, color="black")
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_ylabel("train loss (epoch mean)")
        axes[0][1].grid(alpha=0.3)
    fig.suptitle(f"{s.name} ({s.loss}, {s.dataset})", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=90)
    plt.close(fig)


def plot_comparison(summaries: Sequence[RunSummary], main_metric: str, out_png: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in summaries[:MAX_COMPARED]:
        curve = s.curves.get(_val_key(main_metric))
        if curve:
            steps, values = zip(*curve)
            ax.plot(steps, values, marker="o", markersize=3, label=f"{s.name} ({s.loss})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {main_metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    shown = min(len(summaries), MAX_COMPARED)
    ax.set_title(f"val {main_metric} per epoch ({'the best ' if shown < len(summaries) else ''}{shown} runs)",
                 fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=90)
    plt.close(fig)


def write_report(tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None,
                 experiments: Optional[Sequence[str]] = None, main_metric: str = "mAP",
                 metrics: Sequence[str] = DEFAULT_METRICS, all_runs: bool = False) -> Dict[str, Any]:
    """Write report.md/.html/.csv and the plots; returns their paths and the table."""
    tracking_uri = tracking_uri or default_tracking_uri()
    out_dir = Path(out_dir or OUTPUTS_DIR / "report")
    metrics = list(dict.fromkeys([main_metric, *metrics]))
    summaries = collect_runs(tracking_uri, experiments, main_metric, metrics, all_runs)
    present = [m for m in metrics if any(_val_key(m) in s.curves for s in summaries)]
    table = runs_table(summaries, main_metric, present)

    compare_png = out_dir / f"compare_{_slug(main_metric)}.png"
    plot_comparison(summaries, main_metric, compare_png)
    curve_pngs = []
    for rank, s in enumerate(summaries, start=1):
        png = out_dir / "curves" / f"{rank:02d}_{_slug(s.name)}.png"
        plot_run_curves(s, present, png)
        curve_pngs.append(png)
    for old in (out_dir / "curves").glob("*.png"):  # plots of runs no longer in the report
        if old not in curve_pngs:
            old.unlink()

    generated = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    scope = ", ".join(experiments) if experiments else "all experiments"
    intro = (f"Store `{tracking_uri}`, {scope}: {len(summaries)} run(s), generated {generated}. Sorted by the best "
             f"val {main_metric} over each run's epochs; the other metrics are read at that epoch (`best epoch`). "
             f"`epochs` = training epochs logged, `duration` = wall time of the run.")
    md = ["# Run comparison\n", intro, "", _markdown_table(table), "",
          f"![val {main_metric} per epoch]({compare_png.name})", "", "## Validation curves per run", ""]
    for s, png in zip(summaries, curve_pngs):
        md += [f"### {s.name}", "", f"![{s.name}]({png.relative_to(out_dir).as_posix()})", ""]
    report_md = out_dir / "report.md"
    write_text_atomic(report_md, "\n".join(md))

    body = [f"<h1>Run comparison</h1><p>{html.escape(intro)}</p>", table.to_html(index=False, escape=True),
            f'<p><img src="{compare_png.name}" alt="val {html.escape(main_metric)} per epoch"></p>',
            "<h2>Validation curves per run</h2>"]
    body += [f'<h3>{html.escape(s.name)}</h3><p><img src="{png.relative_to(out_dir).as_posix()}"></p>'
             for s, png in zip(summaries, curve_pngs)]
    report_html = out_dir / "report.html"
    write_text_atomic(report_html, "<!doctype html><html><head><meta charset='utf-8'><title>Run comparison</title>"
                           "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
                           "td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
                           + "\n".join(body) + "</body></html>\n")
    report_csv = out_dir / "report.csv"
    write_csv_atomic(table, report_csv)
    return {"markdown": report_md, "html": report_html, "csv": report_csv, "compare_png": compare_png,
            "curve_pngs": curve_pngs, "table": table, "summaries": summaries}


__all__ = ["DEFAULT_METRICS", "collect_runs", "default_tracking_uri", "format_duration", "loss_name",
           "runs_table", "write_report"]
