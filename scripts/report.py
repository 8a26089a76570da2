"""Compare the runs of the MLflow store: `python scripts/report.py [--experiment NAME]` -> outputs/report/report.md."""
import argparse
import sys

from metriclab.core.constants import DEFAULT_MLFLOW_URI
from metriclab.core.errors import ConfigError
from metriclab.core.paths import OUTPUTS_DIR
from metriclab.tracking.report import DEFAULT_METRICS, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", action="append", metavar="NAME",
                        help="MLflow experiment to report (repeatable); default: every experiment")
    parser.add_argument("--tracking-uri", default=None,
                        help=f"MLflow store; default: $MLFLOW_TRACKING_URI, else {DEFAULT_MLFLOW_URI}")
    parser.add_argument("--out", default=str(OUTPUTS_DIR / "report"), help="output folder (default: %(default)s)")
    parser.add_argument("--metric", default="mAP", help="main metric, sorts the table (default: %(default)s)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma-separated key metrics shown when logged (default: %(default)s)")
    parser.add_argument("--all-runs", action="store_true", help="also list runs without validation metrics")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.tracking_uri, args.out, args.experiment, args.metric,
                              [m.strip() for m in args.metrics.split(",") if m.strip()], args.all_runs)
    except ConfigError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    table = result["table"]
    shown = [c for c in table.columns if c not in ("run id", "dataset", "task", "status")]
    print(table[shown].to_string(index=False))
    print(f"\nreport: {result['markdown']} (+ {result['html'].name}, {result['csv'].name}, "
          f"{len(result['curve_pngs']) + 1} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
