"""Rendered glyphs: an open-set (zero-shot) dataset that needs no download.

The letters and digits of the Latin, Greek and Cyrillic alphabets, rendered with every typeface matplotlib ships
(DejaVu Sans, Sans Mono and Serif, STIX General, Computer Modern: the 22 of its 40 font files that draw them) with a
small seeded affine jitter, as 32x32 grayscale PNGs (white ink on black, like the digits scans). One class per
character shape: cross-script homoglyphs (Latin A, Greek Alpha, Cyrillic A) are merged into one class (`HOMOGLYPHS`),
and a character is only rendered with a font whose character map holds it, so Computer Modern (Latin letters and
digits only) yields no Greek or Cyrillic images. Classes drawn by fewer than `MIN_FONTS` fonts are left out.

Written in the class-folder layout (`train/ validation/ test/<class>/*.png`, stratified 60/20/20 per class) that
`converters/fruits.py` reads; its `--protocol open` splits the CLASSES in two (zero-shot: the validation classes are
never seen in training). File names say what is drawn: `<font stem>_u<code point>_<variant>.png`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

IMAGE_SIZE = 32  # written images are IMAGE_SIZE x IMAGE_SIZE grayscale, like the digits demo
RENDER_SCALE = 4  # glyphs are drawn (and jittered) at 4x, then area-averaged down: smooth edges
EM_FRACTION = 0.66  # the font size, as a fraction of the image side
BASELINE_FRACTION = 0.72  # the baseline's height from the top: capitals, x-height and descenders keep their places
SPLIT_FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}  # stratified per class, like the digits
MIN_FONTS = 2  # a class drawn by fewer fonts is left out: its images would differ only by jitter
IMAGES_PER_FONT = 2  # jittered variants of each (class, font): ~5,000 images with every font
#: Small affine jitter: rotation (degrees), scale and shear (fractions), shift (output pixels); each uniform +-.
JITTER = {"rotate": 6.0, "scale": 0.08, "shear": 0.10, "shift": 1.5}

#: The characters: basic Latin letters, the digits, the 24 Greek letters (final sigma, a positional form of sigma,
#: is left out) and the 33 letters of the Russian alphabet, capital and small.
SCRIPTS: Dict[str, Tuple[int, ...]] = {
    "digit": tuple(range(0x30, 0x3A)),
    "latin": tuple(range(0x41, 0x5B)) + tuple(range(0x61, 0x7B)),
    "greek": tuple(c for c in range(0x391, 0x3AA) if c != 0x3A2) + tuple(c for c in range(0x3B1, 0x3CA) if c != 0x3C2),
    "cyrillic": tuple(range(0x410, 0x450)) + (0x401, 0x451),
}

#: Homoglyphs, merged into one class named after the group's first member. A group is characters whose clean
#: 32x32 renders are the same shape (`same_shape`) in at least 3 of the 16 fonts that hold all three scripts
#: (measured with this module's renderer: most pairs in 13-16 of them; K/Ka, kappa/ka and 3/Ze in the 4 Sans Mono
#: fonts, Phi/Ef in 3 STIX fonts). No other pair of classes is the same shape in any font (tests/test_glyphs.py).
#: Written as code points: the characters themselves cannot be told apart in source code.
HOMOGLYPHS: Tuple[Tuple[int, ...], ...] = (
    (0x41, 0x391, 0x410),  # A: Latin A, Greek Alpha, Cyrillic A
    (0x42, 0x392, 0x412),  # B: Latin B, Greek Beta, Cyrillic Ve
    (0x43, 0x421),  # C: Latin C, Cyrillic Es
    (0x45, 0x395, 0x415),  # E: Latin E, Greek Epsilon, Cyrillic Ie
    (0x48, 0x397, 0x41D),  # H: Latin H, Greek Eta, Cyrillic En
    (0x49, 0x399),  # I: Latin I, Greek Iota
    (0x4B, 0x39A, 0x41A),  # K: Latin K, Greek Kappa, Cyrillic Ka
    (0x4D, 0x39C, 0x41C),  # M: Latin M, Greek Mu, Cyrillic Em
    (0x4E, 0x39D),  # N: Latin N, Greek Nu
    (0x4F, 0x39F, 0x41E),  # O: Latin O, Greek Omicron, Cyrillic O
    (0x50, 0x3A1, 0x420),  # P: Latin P, Greek Rho, Cyrillic Er
    (0x54, 0x3A4, 0x422),  # T: Latin T, Greek Tau, Cyrillic Te
    (0x58, 0x3A7, 0x425),  # X: Latin X, Greek Chi, Cyrillic Ha
    (0x59, 0x3A5),  # Y: Latin Y, Greek Upsilon
    (0x5A, 0x396),  # Z: Latin Z, Greek Zeta
    (0x393, 0x413),  # Greek Gamma, Cyrillic Ghe
    (0x3A0, 0x41F),  # Greek Pi, Cyrillic Pe
    (0x3A6, 0x424),  # Greek Phi, Cyrillic Ef
    (0x61, 0x430),  # a: Latin a, Cyrillic a
    (0x63, 0x441),  # c: Latin c, Cyrillic es
    (0x65, 0x435),  # e: Latin e, Cyrillic ie
    (0x6F, 0x3BF, 0x43E),  # o: Latin o, Greek omicron, Cyrillic o
    (0x70, 0x440),  # p: Latin p, Cyrillic er
    (0x78, 0x445),  # x: Latin x, Cyrillic ha
    (0x79, 0x443),  # y: Latin y, Cyrillic u
    (0x3BA, 0x43A),  # Greek kappa, Cyrillic ka
    (0x33, 0x417),  # digit 3, Cyrillic Ze
)
#: Lookalikes of a few typefaces only: these characters are not drawn with these fonts (not merged: they differ in
#: the others). True italic Cyrillic te, pe and i are drawn as Latin m, n and u; DejaVu Serif draws Cyrillic pe as
#: Greek pi.
FONT_LOOKALIKES: Dict[str, Tuple[int, ...]] = {
    "DejaVuSerif-Italic.ttf": (0x442, 0x43F, 0x438),
    "DejaVuSerif-BoldItalic.ttf": (0x442, 0x43F, 0x438),
    "STIXGeneralItalic.ttf": (0x442, 0x43F, 0x438),
    "STIXGeneralBolIta.ttf": (0x442, 0x43F, 0x438),
    "DejaVuSerif.ttf": (0x43F,),
    "DejaVuSerif-Bold.ttf": (0x43F,),
}
HOMOGLYPH_TOLERANCE = 64  # two clean renders are one shape when no pixel differs by more (of 255 gray levels)
#: Font files whose character map claims characters they do not draw as such.
EXCLUDED_FONTS = {
    "LastResortHE-Regular.ttf": "maps every code point to a placeholder box",
    "cmex10.ttf": "TeX math extension symbols in the ASCII slots",
    "cmsy10.ttf": "TeX math symbols (calligraphic capitals) in the ASCII slots",
}


@dataclass(frozen=True)
class GlyphClass:
    name: str  # folder name: filesystem-safe, readable, unique even on case-insensitive file systems
    members: Tuple[int, ...]  # code points drawn as this class (more than one for a homoglyph group)


@dataclass(frozen=True)
class GlyphImage:
    class_name: str
    code_point: int
    font: Path
    variant: int  # 0..images_per_font-1: the jitter draw

    @property
    def file_name(self) -> str:
        return f"{self.font.stem}_u{self.code_point:04X}_{self.variant}.png"


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def available_fonts(folder: Optional[Path] = None) -> List[Path]:
    """matplotlib's TrueType files, sorted, without `EXCLUDED_FONTS` (fonts without any of our characters drop
    out later, through their character maps)."""
    folder = font_dir() if folder is None else Path(folder)
    return [p for p in sorted(folder.glob("*.ttf")) if p.name not in EXCLUDED_FONTS]


def class_name(code_point: int) -> str:
    """`latin_capital_A`, `latin_small_a`, `greek_small_alpha`, `cyrillic_capital_zhe`, `digit_7`."""
    ch = chr(code_point)
    if ch.isdigit():
        return f"digit_{ch}"
    script, case, _letter, *rest = unicodedata.name(ch).split()  # e.g. CYRILLIC SMALL LETTER SHORT I
    letter = ch if script == "LATIN" else "_".join(rest).lower()
    return f"{script.lower()}_{case.lower()}_{letter}"


def glyph_classes() -> List[GlyphClass]:
    """Every class, sorted by name (the converter's label order): one per character, homoglyph groups as one."""
    group_of = {cp: group for group in HOMOGLYPHS for cp in group}
    classes: Dict[str, GlyphClass] = {}
    for code_points in SCRIPTS.values():
        for cp in code_points:
            members = group_of.get(cp, (cp,))
            name = class_name(members[0])
            classes[name] = GlyphClass(name, members)
    return [classes[k] for k in sorted(classes)]


def font_coverage(font_path: Path) -> set:
    """The code points the font's character map draws (a glyph other than .notdef)."""
    from matplotlib.ft2font import FT2Font

    return {cp for cp, glyph in FT2Font(str(font_path)).get_charmap().items() if glyph != 0}


def renderable(font_path: Path, code_points: Iterable[int]) -> List[int]:
    """Of `code_points`, those the font holds and does not draw as another class (`FONT_LOOKALIKES`)."""
    covered = font_coverage(font_path)
    dropped = set(FONT_LOOKALIKES.get(Path(font_path).name, ()))
    return [cp for cp in code_points if cp in covered and cp not in dropped]


def render_canvas(font_path: Path, code_point: int) -> Optional[np.ndarray]:
    """The glyph on a (RENDER_SCALE x IMAGE_SIZE) square canvas, uint8: centred horizontally on its ink, its
    baseline at BASELINE_FRACTION; None when it draws no ink."""
    from matplotlib.ft2font import FT2Font

    side = IMAGE_SIZE * RENDER_SCALE
    font = FT2Font(str(font_path))
    font.set_size(side * EM_FRACTION, 72)  # at 72 dpi one point is one pixel
    font.set_text(chr(code_point), 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image())
    if not bitmap.size or not bitmap.any():
        return None
    cols = np.flatnonzero(bitmap.max(axis=0))
    bitmap = bitmap[:, cols[0]:cols[-1] + 1]
    descent = font.get_descent() / 64.0  # the bitmap's rows below the baseline (26.6 fixed point)
    top = int(round(side * BASELINE_FRACTION + descent - bitmap.shape[0]))
    left = (side - bitmap.shape[1]) // 2
    canvas = np.zeros((side, side), np.uint8)
    rows = slice(max(top, 0), min(top + bitmap.shape[0], side))
    width = slice(max(left, 0), min(left + bitmap.shape[1], side))
    canvas[rows, width] = bitmap[rows.start - top:rows.stop - top, width.start - left:width.stop - left]
    return canvas


def jitter_matrix(rng: np.random.Generator, side: int) -> np.ndarray:
    """A small random affine map (3x3, output -> input pixel coordinates, as PIL wants it) about the centre."""
    angle = np.deg2rad(rng.uniform(-JITTER["rotate"], JITTER["rotate"]))
    scale = 1.0 + rng.uniform(-JITTER["scale"], JITTER["scale"])
    shear = rng.uniform(-JITTER["shear"], JITTER["shear"])
    shift = rng.uniform(-JITTER["shift"], JITTER["shift"], size=2) * RENDER_SCALE
    c = side / 2.0
    to_centre = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
    rotate = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    shape = np.array([[scale, scale * shear, 0], [0, scale, 0], [0, 0, 1]])
    back = np.array([[1, 0, c + shift[0]], [0, 1, c + shift[1]], [0, 0, 1]])
    return np.linalg.inv(back @ rotate @ shape @ to_centre)


def finish(canvas: np.ndarray, rng: Optional[np.random.Generator] = None) -> Image.Image:
    """The IMAGE_SIZE grayscale image of a canvas: jittered when `rng` is given, then area-averaged down."""
    image = Image.fromarray(canvas, mode="L")
    if rng is not None:
        m = jitter_matrix(rng, canvas.shape[0])
        image = image.transform(image.size, Image.Transform.AFFINE, tuple(m[:2].ravel()),
                                resample=Image.Resampling.BILINEAR, fillcolor=0)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def clean_render(font_path: Path, code_point: int) -> Optional[np.ndarray]:
    """The glyph without jitter (IMAGE_SIZE square, uint8): what the homoglyph checks compare."""
    canvas = render_canvas(font_path, code_point)
    return None if canvas is None else np.asarray(finish(canvas))


def same_shape(a: np.ndarray, b: np.ndarray) -> bool:
    """Two clean renders are one shape: no pixel differs by more than HOMOGLYPH_TOLERANCE."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= HOMOGLYPH_TOLERANCE


def plan_images(classes: Sequence[GlyphClass], fonts: Sequence[Path], images_per_font: int) -> List[GlyphImage]:
    """What to draw: `images_per_font` variants per (class, font holding one of its members); a homoglyph class
    takes its members in turn across fonts. Classes drawn by fewer than MIN_FONTS fonts are left out."""
    coverage = {font: set(renderable(font, [cp for c in classes for cp in c.members])) for font in fonts}
    planned = []
    for glyph_class in classes:
        per_font = [(font, [cp for cp in glyph_class.members if cp in coverage[font]]) for font in fonts]
        per_font = [(font, members) for font, members in per_font if members]
        if len(per_font) < MIN_FONTS:
            continue
        for k, (font, members) in enumerate(per_font):
            planned += [GlyphImage(glyph_class.name, members[(k + v) % len(members)], font, v)
                        for v in range(images_per_font)]
    return planned


def draw(image: GlyphImage, seed: int) -> Image.Image:
    """One jittered image; its jitter depends only on the seed, the font, the character and the variant."""
    canvas = render_canvas(image.font, image.code_point)
    if canvas is None:
        raise ValueError(f"{image.font.name} draws no ink for U+{image.code_point:04X}")
    rng = np.random.default_rng([seed, zlib.crc32(image.font.name.encode()), image.code_point, image.variant])
    return finish(canvas, rng)


def split_images(planned: Sequence[GlyphImage], seed: int) -> Dict[str, List[GlyphImage]]:
    """Stratified per class (SPLIT_FRACTIONS), shuffled with `seed`; a class of two images or more keeps one in
    validation/ (small sets: the converter needs the folder)."""
    rng = np.random.default_rng(seed)
    by_class: Dict[str, List[GlyphImage]] = {}
    for image in planned:
        by_class.setdefault(image.class_name, []).append(image)
    splits: Dict[str, List[GlyphImage]] = {s: [] for s in SPLIT_FRACTIONS}
    for name in sorted(by_class):
        images = [by_class[name][i] for i in rng.permutation(len(by_class[name]))]
        n_val = max(1, int(round(len(images) * SPLIT_FRACTIONS["validation"]))) if len(images) > 1 else 0
        n_train = min(int(round(len(images) * SPLIT_FRACTIONS["train"])), len(images) - n_val)
        splits["train"] += images[:n_train]
        splits["validation"] += images[n_train:n_train + n_val]
        splits["test"] += images[n_train + n_val:]
    return splits


def write_glyph_folders(
    out: Path,
    seed: int = 0,
    images_per_font: int = IMAGES_PER_FONT,
    fonts: Optional[Sequence[Path]] = None,
) -> Dict[str, int]:
    """Write the PNG tree into `out` (replaced atomically); returns images per split. `fonts` (default: every
    available font) and `images_per_font` make smaller sets."""
    fonts = available_fonts() if fonts is None else [Path(f) for f in fonts]
    splits = split_images(plan_images(glyph_classes(), fonts, images_per_font), seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for split, images in splits.items():
            for image in images:
                folder = tmp / split / image.class_name
                folder.mkdir(parents=True, exist_ok=True)
                draw(image, seed).save(folder / image.file_name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {split: len(images) for split, images in splits.items()}
