"""`make ui-screenshots`: open the MLflow UI in headless Chromium as a person would, check what it shows, and save
screenshots (experiment.png, run.png, run_metrics.png) to docs/ui/ (or --out)."""
import argparse
import sys
from pathlib import Path

from metriclab.core.errors import ConfigError
from metriclab.core.paths import OUTPUTS_DIR, REPO_ROOT
from metriclab.tracking.ui_screens import check_ui


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=OUTPUTS_DIR / "mlflow.db", help="the SQLite MLflow store")
    parser.add_argument("--artifacts", type=Path, default=OUTPUTS_DIR / "mlartifacts", help="its artifact root")
    parser.add_argument("--run", default=None, help="run id to show (default: the newest finished training run)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "ui", help="folder for the screenshots")
    args = parser.parse_args(argv)
    try:
        check = check_ui(args.store, args.artifacts, args.out, args.run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MLflow UI, run {check.run_name} ({check.run_id}):")
    for what, seen in check.seen.items():
        print(f"  {'ok  ' if seen else 'MISSING'} {what}")
    for path in check.screenshots:
        print(f"  screenshot: {path}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
