"""Write scikit-learn's digits as PNGs in the fruit-folder layout and convert them to OML's CSV."""
import argparse
import sys
from pathlib import Path

from converters.common import summarize, write_csv_atomically
from converters.fruits import convert_fruits
from metriclab.core.paths import OUTPUTS_DIR
from metriclab.data.digits import write_digits_folders


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUTPUTS_DIR / "data" / "digits", help="dataset folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified 60/20/20 split")
    args = parser.parse_args(argv)
    counts = write_digits_folders(args.out, seed=args.seed)
    conversion = convert_fruits(args.out, protocol="closed", query="validation")  # the user-folder path
    write_csv_atomically(conversion.df, args.out / "dataset.csv", args.out)
    print(f"digits: {counts} images written to {args.out}")
    print(summarize(conversion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
