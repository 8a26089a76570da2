"""Render the Latin, Greek and Cyrillic letters and the digits in matplotlib's fonts as PNGs in the class-folder
layout, and convert them to OML's CSV with the open (zero-shot) protocol: half the classes train, the other half
are unseen validation classes."""
import argparse
import sys
from pathlib import Path

from converters.common import summarize, write_csv_atomically
from converters.fruits import convert_fruits
from metriclab.core.paths import OUTPUTS_DIR
from metriclab.data.glyphs import IMAGES_PER_FONT, available_fonts, write_glyph_folders


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUTPUTS_DIR / "data" / "glyphs", help="dataset folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter and of the 60/20/20 split")
    parser.add_argument("--images-per-font", type=int, default=IMAGES_PER_FONT,
                        help="jittered variants of each character in each font")
    parser.add_argument("--fonts", nargs="+", metavar="FILE",
                        help="font file names (e.g. DejaVuSans.ttf cmr10.ttf) instead of every matplotlib font")
    args = parser.parse_args(argv)
    fonts = available_fonts()
    if args.fonts:
        unknown = sorted(set(args.fonts) - {f.name for f in fonts})
        if unknown:
            parser.error(f"unknown font file(s) {unknown}; choose from {[f.name for f in fonts]}")
        fonts = [f for f in fonts if f.name in args.fonts]
    counts = write_glyph_folders(args.out, seed=args.seed, images_per_font=args.images_per_font, fonts=fonts)
    conversion = convert_fruits(args.out, protocol="open", query="validation")  # the user-folder path
    write_csv_atomically(conversion.df, args.out / "dataset.csv", args.out)
    print(f"glyphs: {counts} images written to {args.out}")
    print(summarize(conversion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
