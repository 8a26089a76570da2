"""The rendered-glyphs open-set dataset: classes and homoglyphs, fonts' character maps, the folder tree, determinism,
and the class-folder converter's open protocol on it. Small font subsets keep it fast (a few seconds)."""
from __future__ import annotations

import importlib.util
import itertools
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from converters.fruits import convert_fruits
from metriclab.data import glyphs
from metriclab.data.glyphs import (
    FONT_LOOKALIKES,
    HOMOGLYPHS,
    IMAGE_SIZE,
    SCRIPTS,
    class_name,
    clean_render,
    font_coverage,
    glyph_classes,
    plan_images,
    renderable,
    same_shape,
    write_glyph_folders,
)

REPO = Path(__file__).resolve().parents[1]
FONTS = {f.name: f for f in glyphs.available_fonts()}
# DejaVu Sans and Sans Mono hold all three scripts; cmr10 only Latin letters and digits; DejaVu Sans Display none.
SMALL_FONTS = ["DejaVuSans.ttf", "DejaVuSansMono.ttf", "cmr10.ttf", "DejaVuSansDisplay.ttf"]
FILE_NAME = re.compile(r"^(?P<font>[A-Za-z0-9-]+)_u(?P<cp>[0-9A-F]{4})_(?P<variant>\d+)\.png$")
GREEK_CYRILLIC = set(SCRIPTS["greek"]) | set(SCRIPTS["cyrillic"])
CLASS_OF = {cp: c.name for c in glyph_classes() for cp in c.members}


def parse(path: Path) -> tuple[str, int]:
    match = FILE_NAME.match(path.name)
    assert match, path.name
    return match["font"], int(match["cp"], 16)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs") / "glyphs"
    counts = write_glyph_folders(root, seed=0, images_per_font=2, fonts=[FONTS[f] for f in SMALL_FONTS])
    return root, counts


def test_the_font_set_is_matplotlibs():
    assert len(FONTS) == 37  # 40 .ttf files less the three EXCLUDED_FONTS
    assert {"LastResortHE-Regular.ttf", "cmex10.ttf", "cmsy10.ttf"}.isdisjoint(FONTS)
    wanted = [cp for c in glyph_classes() for cp in c.members]
    drawing = [f for f in FONTS.values() if renderable(f, wanted)]
    assert len(drawing) == 22  # DejaVu 12 + STIX General 4 + Computer Modern 6


def test_class_names_are_readable_and_safe():
    assert class_name(0x41) == "latin_capital_A" and class_name(0x61) == "latin_small_a"
    assert class_name(0x3B1) == "greek_small_alpha" and class_name(0x3A9) == "greek_capital_omega"
    assert class_name(0x416) == "cyrillic_capital_zhe" and class_name(0x439) == "cyrillic_small_short_i"
    assert class_name(0x37) == "digit_7"
    names = [c.name for c in glyph_classes()]
    assert names == sorted(names) and len(names) == 138  # 176 characters, 38 merged away as homoglyphs
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names)
    assert len({n.lower() for n in names}) == len(names)  # distinct on case-insensitive file systems too


def test_homoglyph_table_merges_each_group_into_one_class():
    members = [cp for group in HOMOGLYPHS for cp in group]
    assert len(members) == len(set(members))  # no character in two groups
    every = {cp for cps in SCRIPTS.values() for cp in cps}
    assert set(members) <= every
    assert len(every) == 176 and len(CLASS_OF) == 176
    assert CLASS_OF[0x41] == CLASS_OF[0x391] == CLASS_OF[0x410] == "latin_capital_A"  # A, Alpha, Cyrillic A
    assert CLASS_OF[0x6F] == CLASS_OF[0x3BF] == CLASS_OF[0x43E] == "latin_small_o"  # o, omicron, Cyrillic o
    assert CLASS_OF[0x393] == CLASS_OF[0x413] == "greek_capital_gamma"
    assert CLASS_OF[0x33] == CLASS_OF[0x417] == "digit_3"  # 3 and Cyrillic Ze
    assert CLASS_OF[0x3B1] != CLASS_OF[0x61]  # alpha is not a
    names = {c.name for c in glyph_classes()}
    assert {"greek_small_omicron", "cyrillic_small_o", "greek_capital_alpha", "cyrillic_capital_a"}.isdisjoint(names)


@pytest.mark.parametrize("font", ["DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Italic.ttf", "cmr10.ttf"])
def test_no_two_kept_classes_are_homoglyphs(font):
    """Every pair of characters from different classes renders as different shapes in this font."""
    path = FONTS[font]
    renders = {cp: clean_render(path, cp) for cp in renderable(path, CLASS_OF)}
    assert all(r is not None for r in renders.values())
    clashes = [(hex(a), hex(b)) for a, b in itertools.combinations(renders, 2)
               if CLASS_OF[a] != CLASS_OF[b] and same_shape(renders[a], renders[b])]
    assert clashes == []


def test_merged_homoglyphs_are_one_shape_and_font_lookalikes_are_dropped():
    sans, mono, italic = FONTS["DejaVuSans.ttf"], FONTS["DejaVuSansMono.ttf"], FONTS["DejaVuSerif-Italic.ttf"]
    for group in [(0x41, 0x391, 0x410), (0x6F, 0x3BF, 0x43E), (0x50, 0x3A1, 0x420)]:
        first, *rest = [clean_render(sans, cp) for cp in group]
        assert all(same_shape(first, r) for r in rest)
    assert same_shape(clean_render(mono, 0x33), clean_render(mono, 0x417))  # 3 and Ze in the Sans Mono fonts
    # italic Cyrillic te is drawn as Latin m: without FONT_LOOKALIKES the two classes would clash in this font
    assert 0x442 in FONT_LOOKALIKES["DejaVuSerif-Italic.ttf"]
    assert same_shape(clean_render(italic, 0x442), clean_render(italic, 0x6D))
    assert 0x442 in font_coverage(italic) and 0x442 not in renderable(italic, [0x442])
    assert not same_shape(clean_render(sans, 0x442), clean_render(sans, 0x6D))  # upright: different shapes


def test_missing_characters_are_not_rendered(small_tree):
    root, _ = small_tree
    assert GREEK_CYRILLIC.isdisjoint(font_coverage(FONTS["cmr10.ttf"]))
    by_font = defaultdict(list)
    for path in root.glob("*/*/*.png"):
        font, cp = parse(path)
        by_font[font].append(cp)
        assert cp in font_coverage(FONTS[f"{font}.ttf"]), path
        assert CLASS_OF[cp] == path.parent.name, path
    assert sorted(by_font) == ["DejaVuSans", "DejaVuSansMono", "cmr10"]  # Sans Display holds none of them
    assert GREEK_CYRILLIC.isdisjoint(by_font["cmr10"])  # no Greek or Cyrillic from a font without them
    assert len(by_font["cmr10"]) == 62 * 2  # every Latin letter and digit class, twice
    assert GREEK_CYRILLIC & set(by_font["DejaVuSans"])


def test_classes_need_two_fonts():
    one_font_greek = plan_images(glyph_classes(), [FONTS["DejaVuSans.ttf"], FONTS["cmr10.ttf"]], 1)
    kept = {i.class_name for i in one_font_greek}
    assert len(kept) == 62 and all(n.startswith(("latin_", "digit_")) for n in kept)
    assert {i.code_point for i in one_font_greek}.isdisjoint(GREEK_CYRILLIC)  # merged classes: Latin member only


def test_folder_layout_and_counts(small_tree):
    root, counts = small_tree
    # 62 Latin/digit classes x 3 fonts x 2 + 76 Greek/Cyrillic classes x 2 fonts x 2 = 676 images;
    # per class 6 -> 4/1/1, 4 -> 2/1/1
    assert counts == {"train": 400, "validation": 138, "test": 138}
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "validation"]
    fonts_of = defaultdict(set)
    for split, n in counts.items():
        files = sorted((root / split).glob("*/*.png"))
        assert len(files) == n
        assert sorted({f.parent.name for f in files}) == [c.name for c in glyph_classes()]
        for f in files:
            fonts_of[f.parent.name].add(parse(f)[0])
    assert all(len(fonts) >= 2 for fonts in fonts_of.values())
    assert {len(v) for k, v in fonts_of.items() if k.startswith("greek_")} == {2}
    image = Image.open(next((root / "train" / "cyrillic_capital_zhe").glob("*.png")))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "L"
    pixels = np.asarray(image)
    assert pixels.max() == 255 and pixels[0].max() == 0  # white ink on black, margin kept


def test_lowercase_and_capitals_differ_in_size_and_place():
    sans = FONTS["DejaVuSans.ttf"]
    rows = {cp: np.flatnonzero(clean_render(sans, cp).max(axis=1) > 64) for cp in (0x4F, 0x6F, 0x70)}  # O o p
    assert rows[0x4F][0] < rows[0x6F][0] and rows[0x4F][-1] == rows[0x6F][-1]  # same baseline, o is shorter
    assert rows[0x70][-1] > rows[0x6F][-1]  # p descends


def test_same_seed_same_bytes(tmp_path):
    fonts = [FONTS["DejaVuSans.ttf"], FONTS["cmr10.ttf"]]

    def contents(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("*/*/*.png"))}

    write_glyph_folders(tmp_path / "a", seed=3, images_per_font=1, fonts=fonts)
    write_glyph_folders(tmp_path / "b", seed=3, images_per_font=1, fonts=fonts)
    write_glyph_folders(tmp_path / "c", seed=4, images_per_font=1, fonts=fonts)
    a, b, c = contents(tmp_path / "a"), contents(tmp_path / "b"), contents(tmp_path / "c")
    assert len(a) == 62 * 2 and a == b
    # another seed: the same characters and fonts, split otherwise and jittered otherwise
    assert sorted(p.split("/", 1)[1] for p in a) == sorted(p.split("/", 1)[1] for p in c)
    assert set(a) != set(c)
    by_name = {p.rsplit("/", 1)[1]: v for p, v in a.items()}
    assert sum(by_name[p.rsplit("/", 1)[1]] != v for p, v in c.items()) > len(c) * 0.9


def test_open_protocol_holds_out_whole_classes(small_tree):
    root, counts = small_tree
    df = convert_fruits(root, protocol="open").df
    train, val = df[df.split == "train"], df[df.split == "validation"]
    assert len(df) == counts["train"] + counts["validation"]
    assert set(train.class_name).isdisjoint(val.class_name)
    assert train.class_name.nunique() == val.class_name.nunique() == 69
    assert set(train.class_name) | set(val.class_name) == {c.name for c in glyph_classes()}
    assert val.is_query.all() and val.is_gallery.all()
    assert train.label.max() < val.label.min()


def test_prepare_script_writes_the_open_protocol_csv(tmp_path, capsys):
    prepare_main = load_script("prepare_glyphs").main
    out = tmp_path / "glyphs"
    assert prepare_main(["--out", str(out), "--fonts", "DejaVuSans.ttf", "cmr10.ttf", "--images-per-font", "1"]) == 0
    df = pd.read_csv(out / "dataset.csv")
    assert len(df) == 62 * 2 and df[df.split == "validation"].class_name.nunique() == 31
    assert "glyphs: {'train': 62, 'validation': 62, 'test': 0}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--out", str(out), "--fonts", "Arial.ttf"])
    assert exit_info.value.code == 2


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_differ_only_in_the_loss(small_tree, tmp_path):
    root, _ = small_tree
    from converters.common import write_csv_atomically

    write_csv_atomically(convert_fruits(root, protocol="open").df, root / "dataset.csv", root)
    demo = load_script("demo_glyphs")
    common = [f"dataset.root={root}", f"paths.outputs_dir={tmp_path}"]
    triplet, arcface = (demo.compose_run(overrides + common) for overrides in demo.RUNS.values())
    assert triplet.criterion._target_ == "oml.losses.TripletLossWithMiner" and triplet.validate_before_training
    assert arcface.criterion._target_ == "metriclab.models.losses.ArcFaceLoss" and not arcface.validate_before_training
    for cfg in (triplet, arcface):
        assert cfg.extractor.weights is None and cfg.num_threads == 1 and cfg.trainer.accelerator == "cpu"
        assert cfg.trainer.check_val_every_n_epoch == cfg.trainer.max_epochs  # no model picked on unseen classes
        assert cfg.sampler.n_labels * cfg.sampler.n_instances == 64
    assert str(triplet.paths.run_dir).startswith(f"{tmp_path}/train/")
    assert triplet.paths.run_dir != arcface.paths.run_dir
    text = demo.table({"random init": {"mAP": 0.1, "cmc@1": 0.5}, "ArcFace": {"mAP": 0.5, "cmc@1": 0.9}})
    assert text.splitlines()[2].split() == ["mAP", "0.1000", "0.5000"]
    assert len(text.splitlines()) == 4  # rows without a value in every column are left out
