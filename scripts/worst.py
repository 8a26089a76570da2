"""`make worst RUN=<mlflow run id>`: fetch a run's worst-query grids and tables, and print where they are."""
import argparse
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from metriclab.core.constants import DEFAULT_MLFLOW_URI
from metriclab.core.paths import OUTPUTS_DIR
from metriclab.tracking.keys import default_tracking_uri


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_id", help="MLflow run id (see `make ui` or a run's tags)")
    parser.add_argument("--tracking-uri", default=default_tracking_uri(),
                        help=f"MLflow store; default: $MLFLOW_TRACKING_URI, else {DEFAULT_MLFLOW_URI}")
    parser.add_argument("--out", type=Path, default=None, help="folder to fetch into (default outputs/worst/<run>)")
    args = parser.parse_args(argv)
    client = MlflowClient(args.tracking_uri)
    try:
        run = client.get_run(args.run_id)
    except Exception as e:
        print(f"error: no run {args.run_id} in {args.tracking_uri}: {e}", file=sys.stderr)
        return 2
    if not client.list_artifacts(args.run_id, "worst_queries"):
        print(f"error: run {args.run_id} ({run.info.run_name}) has no worst_queries/ artifacts", file=sys.stderr)
        return 2
    out = args.out or OUTPUTS_DIR / "worst" / args.run_id
    out.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(args.run_id, "worst_queries", str(out)))
    print(f"{run.info.run_name} ({run.info.status}): worst queries fetched to {local}")
    for folder in sorted(p for p in local.iterdir() if p.is_dir()):
        for f in sorted(folder.iterdir()):
            print(f"  {f}")
        table = folder / "worst_queries.csv"
        if table.exists():
            print("    " + table.read_text().strip().replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
