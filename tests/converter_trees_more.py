"""Small dataset trees that copy the real SOP, InShop, CUB-200-2011, MSMT17, CUHK03-NP and VeRi-776 layouts
(folder and file names, list-file formats with their headers and count lines), for the converter tests.

Each writer returns the tree's root; the module-level specs say what is in it, so the tests can compare
the converted rows with them."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from converter_trees import jpeg_bytes, png_bytes, write

# ------------------------------------------------------------------------------------------------ SOP

SOP_HEADER = "image_id class_id super_class_id path"
# super_class_id -> folder: 1 = bicycle as in the release; the rest in alphabetical order.
SOP_FOLDERS = [
    "bicycle_final", "cabinet_final", "chair_final", "coffee_maker_final", "fan_final", "kettle_final",
    "lamp_final", "mug_final", "sofa_final", "stapler_final", "table_final", "toaster_final",
]  # fmt: skip
# (class_id, super_class_id, eBay product number, images): train classes 1-4, test classes 5-7 (the release
# numbers its classes globally: train 1-11,318, test 11,319-22,634).
SOP_TRAIN_PRODUCTS = [(1, 1, 111085122871, 3), (2, 1, 111265328556, 2), (3, 3, 121005413404, 2), (4, 8, 1310, 4)]
SOP_TEST_PRODUCTS = [(5, 1, 111200201478, 2), (6, 8, 251097862321, 3), (7, 12, 391066419316, 2)]


def sop_lines(products: Sequence[tuple[int, int, int, int]], first_image_id: int = 1) -> list[str]:
    """Ebay_*.txt data lines: ``image_id class_id super_class_id <folder>/<product>_<k>.JPG``."""
    lines, image_id = [], first_image_id
    for class_id, super_id, product, n in products:
        for k in range(n):
            lines.append(f"{image_id} {class_id} {super_id} {SOP_FOLDERS[super_id - 1]}/{product}_{k}.JPG")
            image_id += 1
    return lines


def write_sop_tree(
    root: Path,
    train_lines: Sequence[str] | None = None,
    test_lines: Sequence[str] | None = None,
    header: str = SOP_HEADER,
) -> Path:
    """Stanford_Online_Products/ as unpacked (pass root/'Stanford_Online_Products' for the nested layout).
    Image ids restart at 1 in Ebay_test.txt here, which the converter must not rely on either way."""
    train_lines = sop_lines(SOP_TRAIN_PRODUCTS) if train_lines is None else train_lines
    test_lines = sop_lines(SOP_TEST_PRODUCTS) if test_lines is None else test_lines
    seed = 0
    for line in list(train_lines) + list(test_lines):
        seed += 1
        write(root / line.split()[-1], jpeg_bytes(seed=seed))
    for name, lines in (("Ebay_train.txt", train_lines), ("Ebay_test.txt", test_lines)):
        write(root / name, ("\n".join([header, *lines]) + "\n").encode())
    info = [f"{i + 1} {line.split(' ', 1)[1]}" for i, line in enumerate(list(train_lines) + list(test_lines))]
    write(root / "Ebay_info.txt", ("\n".join([SOP_HEADER, *info]) + "\n").encode())
    write(root / "Ebay_final.txt", b"image_id class_id super_class_id path\n")
    write(root / "bicycle_final.txt", b"")
    write(root / "README", b"Stanford Online Products")
    write(root / "LICENSE", b"")
    write(root / "bicycle_final" / "Thumbs.db", b"\x00")
    return root


# --------------------------------------------------------------------------------------------- InShop

INSHOP_PARTITION_HEADER = "image_name item_id evaluation_status"
INSHOP_BBOX_HEADER = "image_name clothes_type pose_type x_1 y_1 x_2 y_2"
INSHOP_IMAGE_SIZE = (32, 32)  # the release's are 256x256; boxes below are drawn inside 32x32
# (image_name, item_id, status, clothes_type, pose_type, box)
INSHOP_ENTRIES = [
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train", 2, 1, (3, 1, 29, 31)),
    ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "train", 2, 2, (5, 2, 27, 30)),
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train", 3, 1, (0, 0, 32, 32)),
    ("img/WOMEN/Dresses/id_00000002/02_3_back.jpg", "id_00000002", "train", 3, 3, (2, 2, 30, 31)),
    ("img/WOMEN/Dresses/id_00000002/02_4_full.jpg", "id_00000002", "train", 3, 4, (1, 1, 31, 31)),
    ("img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg", "id_00000001", "train", 1, 1, (4, 4, 28, 40)),
    ("img/MEN/Denim/id_00000182/01_1_front.jpg", "id_00000182", "query", 2, 1, (3, 3, 29, 29)),
    ("img/MEN/Denim/id_00000182/01_2_side.jpg", "id_00000182", "gallery", 2, 2, (6, 2, 26, 30)),
    ("img/MEN/Denim/id_00000182/01_4_full.jpg", "id_00000182", "gallery", 2, 4, (1, 1, 31, 31)),
    ("img/WOMEN/Tees_Tanks/id_00000150/03_1_front.jpg", "id_00000150", "query", 1, 1, (2, 5, 30, 27)),
    ("img/WOMEN/Tees_Tanks/id_00000150/03_2_side.jpg", "id_00000150", "query", 1, 2, (2, 5, 30, 27)),
    ("img/WOMEN/Tees_Tanks/id_00000150/03_7_additional.jpg", "id_00000150", "gallery", 1, 6, (8, 8, 24, 24)),
]  # fmt: skip
# one box (Blouses_Shirts, y_2 = 40) reaches beyond its 32x32 image: clipped to 32


def _aligned(rows: Iterable[Sequence[object]], width: int = 60) -> list[str]:
    """The release pads the image name with spaces so that the columns line up."""
    return [str(row[0]).ljust(width) + " ".join(str(v) for v in row[1:]) for row in rows]


def write_inshop_tree(root: Path, layout: str = "release", entries: Sequence[tuple] = INSHOP_ENTRIES) -> Path:
    """layout 'release': Img/img/..., Anno/list_bbox_inshop.txt, Eval/list_eval_partition.txt;
    'flat': img/ and both list files at the top (OML's expectation)."""
    images, anno, evaluation = (root / "Img", root / "Anno", root / "Eval") if layout == "release" else (root,) * 3
    for i, (name, *_) in enumerate(entries):
        write(images / name, jpeg_bytes(*INSHOP_IMAGE_SIZE, seed=i))
    partition = _aligned((name, item, status) for name, item, status, *_ in entries)
    boxes = _aligned((name, ctype, pose, *box) for name, _, _, ctype, pose, box in entries)
    count = str(len(entries))
    write(evaluation / "list_eval_partition.txt", "\n".join([count, INSHOP_PARTITION_HEADER, *partition]).encode())
    write(anno / "list_bbox_inshop.txt", "\n".join([count, INSHOP_BBOX_HEADER, *boxes]).encode())
    write(anno / "list_item_inshop.txt", f"{len({e[1] for e in entries})}\n".encode())
    write(anno / "list_landmarks_inshop.txt", b"0\n")
    if layout == "release":
        write(images / "img.zip", b"PK\x05\x06" + b"\x00" * 18)  # kept next to what it unpacked
    write(root / "README.txt", b"In-shop Clothes Retrieval Benchmark")
    return root


# ---------------------------------------------------------------------------------------- CUB-200-2011

CUB_KNOWN_CLASSES = {
    1: "Black_footed_Albatross", 2: "Laysan_Albatross", 100: "Brown_Pelican", 101: "White_Pelican",
    200: "Common_Yellowthroat",
}  # fmt: skip
CUB_IMAGE_SIZE = (40, 30)


def cub_class_folder(class_id: int) -> str:
    return f"{class_id:03d}.{CUB_KNOWN_CLASSES.get(class_id, f'Bird_{class_id:03d}')}"


# (class_id, is_training_image, (x, y, width, height)) per image, image ids 1.. in this order
CUB_IMAGES = [
    (1, 1, (1.0, 2.0, 30.0, 20.0)),
    (1, 0, (0.0, 0.0, 40.0, 30.0)),
    (1, 1, (5.5, 3.7, 20.2, 10.9)),  # floats truncate: (5, 3, 25, 14)
    (2, 0, (2.0, 2.0, 10.0, 10.0)),
    (2, 1, (2.0, 2.0, 10.0, 10.0)),
    (100, 1, (10.0, 5.0, 30.6, 20.0)),  # x + width = 40.6 -> 40: inside the 40-wide image
    (101, 1, (1.0, 1.0, 5.0, 5.0)),
    (101, 0, (1.0, 1.0, 38.0, 28.0)),
    (101, 1, (3.0, 4.0, 12.0, 9.0)),
    (200, 0, (0.0, 0.0, 12.0, 30.5)),  # y + height = 30.5 -> 30
    (200, 1, (7.0, 7.0, 40.0, 10.0)),  # x + width = 47 > 40: clipped to the image
]


def cub_image_name(image_id: int, class_id: int) -> str:
    """'001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg' style: folder and file capitalised
    differently, as in the release."""
    folder = cub_class_folder(class_id)
    stem = "_".join(w.capitalize() for w in folder.split(".", 1)[1].split("_"))
    return f"{folder}/{stem}_{image_id:04d}_{40 + image_id}.jpg"


def write_cub_tree(root: Path, images: Sequence[tuple] = CUB_IMAGES, nested: bool = True) -> Path:
    """The tgz's CUB_200_2011/ (and attributes.txt next to it) under root; nested=False: the contents only."""
    base = root / "CUB_200_2011" if nested else root
    lines: dict[str, list[str]] = {n: [] for n in ("images", "labels", "split", "boxes")}
    for image_id, (class_id, is_training, (x, y, w, h)) in enumerate(images, start=1):
        name = cub_image_name(image_id, class_id)
        write(base / "images" / name, jpeg_bytes(*CUB_IMAGE_SIZE, seed=image_id))
        lines["images"].append(f"{image_id} {name}")
        lines["labels"].append(f"{image_id} {class_id}")
        lines["split"].append(f"{image_id} {is_training}")
        lines["boxes"].append(f"{image_id} {x} {y} {w} {h}")
    files = {"images": "images.txt", "labels": "image_class_labels.txt", "split": "train_test_split.txt",
             "boxes": "bounding_boxes.txt"}  # fmt: skip
    for key, name in files.items():
        write(base / name, ("\n".join(lines[key]) + "\n").encode())
    classes = [f"{c} {cub_class_folder(c)}" for c in range(1, 201)]
    write(base / "classes.txt", ("\n".join(classes) + "\n").encode())
    write(base / "README", b"CUB-200-2011")
    write(base / "attributes" / "certainties.txt", b"1 not visible\n")
    write(base / "parts" / "parts.txt", b"1 back\n")
    if nested:
        write(root / "attributes.txt", b"1 has_bill_shape::curved_(up_or_down)\n")
    return root


# --------------------------------------------------------------------------------------------- MSMT17

# (person id, camera, list): train persons 0-2, test persons 0-2 (the release numbers both from 0)
MSMT_TRAIN = [(0, 1, "train"), (0, 2, "train"), (1, 5, "train"), (1, 5, "train"), (2, 7, "val"), (2, 9, "val")]
MSMT_QUERY = [(0, 3, "query"), (1, 12, "query"), (2, 15, "query")]
MSMT_GALLERY = [(0, 3, "gallery"), (0, 4, "gallery"), (1, 1, "gallery"), (2, 15, "gallery"), (2, 10, "gallery")]
MSMT_TIMES = ("morning", "noon", "afternoon")


def msmt_lines(entries: Sequence[tuple[int, int, str]], start: int = 0) -> list[tuple[str, str]]:
    """(list name, '<pid folder>/<file> <pid>'): files PPPP_NNN_CC_<date><time>_NNNN_N.jpg."""
    result = []
    for k, (pid, cam, list_name) in enumerate(entries, start=start):
        name = f"{pid:04d}_{k:03d}_{cam:02d}_0303{MSMT_TIMES[k % 3]}_{k * 7 % 10000:04d}_{k % 4}.jpg"
        result.append((list_name, f"{pid:04d}/{name} {pid}"))
    return result


def write_msmt_tree(root: Path, version: str = "V1", extra_lines: dict[str, list[str]] | None = None) -> Path:
    """MSMT17_V1/{train,test}/ or MSMT17_V2/{mask_train_v2,mask_test_v2}/ with the four list files, under root."""
    base = root / f"MSMT17_{version}"
    train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    entries = msmt_lines(MSMT_TRAIN) + msmt_lines(MSMT_QUERY + MSMT_GALLERY, start=100)
    for k, (list_name, line) in enumerate(entries):
        folder = train_dir if list_name in ("train", "val") else test_dir
        write(base / folder / line.split()[0], jpeg_bytes(seed=k))
        lists[list_name].append(line)
    for list_name, lines in (extra_lines or {}).items():
        lists[list_name] += lines
    for list_name, lines in lists.items():
        write(base / f"list_{list_name}.txt", ("\n".join(lines) + "\n").encode())
    return root


# ------------------------------------------------------------------------------------------ CUHK03-NP

CUHK_TRAIN = ["0001_c1_1.png", "0001_c1_2.png", "0001_c2_1.png", "0003_c1_1.png", "0003_c2_4.png"]
CUHK_QUERY = ["0002_c1_1.png", "0002_c2_1.png", "0005_c1_3.png", "0005_c2_2.png"]
CUHK_GALLERY = ["0002_c1_2.png", "0002_c2_2.png", "0002_c2_3.png", "0005_c1_1.png", "0005_c2_1.png"]


def write_cuhk03np_tree(
    root: Path,
    train: Sequence[str] = CUHK_TRAIN,
    query: Sequence[str] = CUHK_QUERY,
    gallery: Sequence[str] = CUHK_GALLERY,
) -> Path:
    """cuhk03-np/{labeled,detected}/{bounding_box_train,bounding_box_test,query}/*.png under root; the
    detected subset has one more gallery image (DPM found another box)."""
    base = root / "cuhk03-np"
    image = png_bytes(8, 16, mode="RGB")
    for subset, extra in (("labeled", []), ("detected", ["0005_c2_5.png"])):
        folders = (("bounding_box_train", train), ("query", query), ("bounding_box_test", [*gallery, *extra]))
        for folder, names in folders:
            for name in names:
                write(base / subset / folder / name, image)
    write(base / "README.md", b"CUHK03-NP")
    return root


# ------------------------------------------------------------------------------------------- VeRi-776

VERI_TRAIN = ["0001_c001_00016450_0.jpg", "0001_c002_00016460_1.jpg", "0003_c012_00045230_0.jpg",
              "0003_c020_00045300_0.jpg"]  # fmt: skip
VERI_QUERY = ["0002_c002_00030600_0.jpg", "0005_c014_00078990_1.jpg"]
VERI_GALLERY = [
    "0002_c002_00030600_0.jpg",  # the query's own copy: same vehicle and camera, left out by `sequence`
    "0002_c002_00030655_0.jpg",
    "0002_c007_00031100_0.jpg",
    "0005_c003_00079100_0.jpg",
    "0005_c014_00078990_1.jpg",
    "0005_c015_00080100_0.jpg",
]


def write_veri_tree(
    root: Path,
    train: Sequence[str] = VERI_TRAIN,
    query: Sequence[str] = VERI_QUERY,
    gallery: Sequence[str] = VERI_GALLERY,
    name_lists: bool = True,
) -> Path:
    """VeRi/ as unpacked, under root: the three image folders, their name_*.txt and the other files."""
    base = root / "VeRi"
    for folder, list_name, names in (
        ("image_train", "name_train.txt", train),
        ("image_query", "name_query.txt", query),
        ("image_test", "name_test.txt", gallery),
    ):
        for k, name in enumerate(names):
            write(base / folder / name, jpeg_bytes(24, 16, seed=k))
        if name_lists:
            write(base / list_name, ("\n".join(names) + "\n").encode())
    for name in ("gt_index.txt", "jk_index.txt", "test_track.txt", "camera_ID.txt", "train_label.xml"):
        write(base / name, b"")
    return root


# ------------------------------------------------------------------------------------------- checking


def read_written_csv(root: Path, csv_name: str = "dataset.csv"):
    """The CSV a converter wrote, read back and checked with the contract training reads (OML's rules too)."""
    import pandas as pd

    from metriclab.data.contract import validate_dataset_frame

    csv_path = root / csv_name
    df = pd.read_csv(csv_path)
    validate_dataset_frame(df, str(csv_path), csv_path=csv_path, for_oml=True, dataset_root=root)
    return df
