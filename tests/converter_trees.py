"""Small dataset trees that copy the real Market-1501, Stanford Cars and fruits layouts (names, folders,
.mat structures written with scipy), for the converter tests."""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.io
from PIL import Image

# ----------------------------------------------------------------------------------------------- images


def jpeg_bytes(width: int = 16, height: int = 12, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(width: int = 16, height: int = 12, seed: int = 0, mode: str = "RGBA") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ Market-1501

MARKET_TRAIN = [
    "0002_c1s1_000451_03.jpg",
    "0002_c2s1_000301_01.jpg",
    "0007_c3s1_000101_02.jpg",
    "0007_c3s2_000201_01.jpg",
    "0007_c5s1_000501_01.jpg",
]
MARKET_QUERY = ["0001_c1s1_001051_00.jpg", "0001_c2s1_000376_00.jpg", "0003_c4s2_000051_00.jpg"]
MARKET_GALLERY = [
    "0001_c1s1_001051_03.jpg",  # same person and camera as the first query: masked for it by `sequence`
    "0001_c2s1_000401_01.jpg",
    "0001_c5s1_000121_02.jpg",
    "0003_c4s2_000076_01.jpg",
    "0003_c6s1_000101_01.jpg",
    "0000_c1s1_000151_01.jpg",  # distractors
    "0000_c3s1_000251_04.jpg",
    "-1_c1s1_000401_03.jpg",  # junk
    "-1_c2s1_000551_02.jpg",
]


def write_market_tree(
    root: Path,
    train: Iterable[str] = MARKET_TRAIN,
    query: Iterable[str] = MARKET_QUERY,
    gallery: Iterable[str] = MARKET_GALLERY,
    image: bytes = b"",
) -> Path:
    """Market-1501-v15.09.15/ as unpacked; `image` is the content of every .jpg (the converter reads names)."""
    for folder, names in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(image)
    write(root / "bounding_box_test" / "Thumbs.db", b"\x00thumbs")
    write(root / "gt_bbox" / "0001_c1s1_001051_00.jpg", image)
    write(root / "gt_query" / "0001_c1s1_001051_00_good.mat", b"MATLAB 5.0")
    write(root / "readme.txt", b"Market-1501 naming rules")
    return root


def write_market_published_counts(root: Path) -> Path:
    """Empty files in the exact published numbers: 12,936 train images of 751 ids, 3,368 queries of 750 ids
    (at most one per person and camera), 13,115 valid gallery images + 2,798 distractors + 3,819 junk."""
    train_pids = list(range(2, 1501, 2)) + [1501]  # 751 ids
    test_pids = list(range(1, 1500, 2))  # 750 ids
    frame = iter(range(1, 10**6))

    def names(pids: Sequence[int], total: int, cams_cycle: bool = True) -> list[str]:
        base, extra = divmod(total, len(pids))
        result = []
        for k, pid in enumerate(pids):
            for j in range(base + (k < extra)):
                cam = j % 6 + 1
                result.append(f"{pid:04d}_c{cam}s1_{next(frame):06d}_01.jpg")
        return result

    train = names(train_pids, 12_936)
    query = [n.replace("_01.jpg", "_00.jpg") for n in names(test_pids, 3_368)]  # <= 6 per id: one per camera
    gallery = names(test_pids, 13_115)
    gallery += [f"0000_c{k % 6 + 1}s1_{next(frame):06d}_02.jpg" for k in range(2_798)]
    gallery += [f"-1_c{k % 6 + 1}s1_{next(frame):06d}_03.jpg" for k in range(3_819)]
    return write_market_tree(root, train, query, gallery)


# -------------------------------------------------------------------------------------- Stanford Cars

# devkit/cars_meta.mat `class_names`, in file order (index 0 = class 1).
CARS196_CLASS_NAMES = [
    "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008",
    "Acura TSX Sedan 2012", "Acura Integra Type R 2001", "Acura ZDX Hatchback 2012",
    "Aston Martin V8 Vantage Convertible 2012", "Aston Martin V8 Vantage Coupe 2012",
    "Aston Martin Virage Convertible 2012", "Aston Martin Virage Coupe 2012", "Audi RS 4 Convertible 2008",
    "Audi A5 Coupe 2012", "Audi TTS Coupe 2012", "Audi R8 Coupe 2012", "Audi V8 Sedan 1994", "Audi 100 Sedan 1994",
    "Audi 100 Wagon 1994", "Audi TT Hatchback 2011", "Audi S6 Sedan 2011", "Audi S5 Convertible 2012",
    "Audi S5 Coupe 2012", "Audi S4 Sedan 2012", "Audi S4 Sedan 2007", "Audi TT RS Coupe 2012",
    "BMW ActiveHybrid 5 Sedan 2012", "BMW 1 Series Convertible 2012", "BMW 1 Series Coupe 2012",
    "BMW 3 Series Sedan 2012", "BMW 3 Series Wagon 2012", "BMW 6 Series Convertible 2007", "BMW X5 SUV 2007",
    "BMW X6 SUV 2012", "BMW M3 Coupe 2012", "BMW M5 Sedan 2010", "BMW M6 Convertible 2010", "BMW X3 SUV 2012",
    "BMW Z4 Convertible 2012", "Bentley Continental Supersports Conv. Convertible 2012", "Bentley Arnage Sedan 2009",
    "Bentley Mulsanne Sedan 2011", "Bentley Continental GT Coupe 2012", "Bentley Continental GT Coupe 2007",
    "Bentley Continental Flying Spur Sedan 2007", "Bugatti Veyron 16.4 Convertible 2009",
    "Bugatti Veyron 16.4 Coupe 2009", "Buick Regal GS 2012", "Buick Rainier SUV 2007", "Buick Verano Sedan 2012",
    "Buick Enclave SUV 2012", "Cadillac CTS-V Sedan 2012", "Cadillac SRX SUV 2012",
    "Cadillac Escalade EXT Crew Cab 2007", "Chevrolet Silverado 1500 Hybrid Crew Cab 2012",
    "Chevrolet Corvette Convertible 2012", "Chevrolet Corvette ZR1 2012",
    "Chevrolet Corvette Ron Fellows Edition Z06 2007", "Chevrolet Traverse SUV 2012",
    "Chevrolet Camaro Convertible 2012", "Chevrolet HHR SS 2010", "Chevrolet Impala Sedan 2007",
    "Chevrolet Tahoe Hybrid SUV 2012", "Chevrolet Sonic Sedan 2012", "Chevrolet Express Cargo Van 2007",
    "Chevrolet Avalanche Crew Cab 2012", "Chevrolet Cobalt SS 2010", "Chevrolet Malibu Hybrid Sedan 2010",
    "Chevrolet TrailBlazer SS 2009", "Chevrolet Silverado 2500HD Regular Cab 2012",
    "Chevrolet Silverado 1500 Classic Extended Cab 2007", "Chevrolet Express Van 2007",
    "Chevrolet Monte Carlo Coupe 2007", "Chevrolet Malibu Sedan 2007", "Chevrolet Silverado 1500 Extended Cab 2012",
    "Chevrolet Silverado 1500 Regular Cab 2012", "Chrysler Aspen SUV 2009", "Chrysler Sebring Convertible 2010",
    "Chrysler Town and Country Minivan 2012", "Chrysler 300 SRT-8 2010", "Chrysler Crossfire Convertible 2008",
    "Chrysler PT Cruiser Convertible 2008", "Daewoo Nubira Wagon 2002", "Dodge Caliber Wagon 2012",
    "Dodge Caliber Wagon 2007", "Dodge Caravan Minivan 1997", "Dodge Ram Pickup 3500 Crew Cab 2010",
    "Dodge Ram Pickup 3500 Quad Cab 2009", "Dodge Sprinter Cargo Van 2009", "Dodge Journey SUV 2012",
    "Dodge Dakota Crew Cab 2010", "Dodge Dakota Club Cab 2007", "Dodge Magnum Wagon 2008",
    "Dodge Challenger SRT8 2011", "Dodge Durango SUV 2012", "Dodge Durango SUV 2007", "Dodge Charger Sedan 2012",
    "Dodge Charger SRT-8 2009", "Eagle Talon Hatchback 1998", "FIAT 500 Abarth 2012", "FIAT 500 Convertible 2012",
    "Ferrari FF Coupe 2012", "Ferrari California Convertible 2012", "Ferrari 458 Italia Convertible 2012",
    "Ferrari 458 Italia Coupe 2012", "Fisker Karma Sedan 2012", "Ford F-450 Super Duty Crew Cab 2012",
    "Ford Mustang Convertible 2007", "Ford Freestar Minivan 2007", "Ford Expedition EL SUV 2009",
    "Ford Edge SUV 2012", "Ford Ranger SuperCab 2011", "Ford GT Coupe 2006", "Ford F-150 Regular Cab 2012",
    "Ford F-150 Regular Cab 2007", "Ford Focus Sedan 2007", "Ford E-Series Wagon Van 2012",
    "Ford Fiesta Sedan 2012", "GMC Terrain SUV 2012", "GMC Savana Van 2012", "GMC Yukon Hybrid SUV 2012",
    "GMC Acadia SUV 2012", "GMC Canyon Extended Cab 2012", "Geo Metro Convertible 1993", "HUMMER H3T Crew Cab 2010",
    "HUMMER H2 SUT Crew Cab 2009", "Honda Odyssey Minivan 2012", "Honda Odyssey Minivan 2007",
    "Honda Accord Coupe 2012", "Honda Accord Sedan 2012", "Hyundai Veloster Hatchback 2012",
    "Hyundai Santa Fe SUV 2012", "Hyundai Tucson SUV 2012", "Hyundai Veracruz SUV 2012",
    "Hyundai Sonata Hybrid Sedan 2012", "Hyundai Elantra Sedan 2007", "Hyundai Accent Sedan 2012",
    "Hyundai Genesis Sedan 2012", "Hyundai Sonata Sedan 2012", "Hyundai Elantra Touring Hatchback 2012",
    "Hyundai Azera Sedan 2012", "Infiniti G Coupe IPL 2012", "Infiniti QX56 SUV 2011", "Isuzu Ascender SUV 2008",
    "Jaguar XK XKR 2012", "Jeep Patriot SUV 2012", "Jeep Wrangler SUV 2012", "Jeep Liberty SUV 2012",
    "Jeep Grand Cherokee SUV 2012", "Jeep Compass SUV 2012", "Lamborghini Reventon Coupe 2008",
    "Lamborghini Aventador Coupe 2012", "Lamborghini Gallardo LP 570-4 Superleggera 2012",
    "Lamborghini Diablo Coupe 2001", "Land Rover Range Rover SUV 2012", "Land Rover LR2 SUV 2012",
    "Lincoln Town Car Sedan 2011", "MINI Cooper Roadster Convertible 2012", "Maybach Landaulet Convertible 2012",
    "Mazda Tribute SUV 2011", "McLaren MP4-12C Coupe 2012", "Mercedes-Benz 300-Class Convertible 1993",
    "Mercedes-Benz C-Class Sedan 2012", "Mercedes-Benz SL-Class Coupe 2009", "Mercedes-Benz E-Class Sedan 2012",
    "Mercedes-Benz S-Class Sedan 2012", "Mercedes-Benz Sprinter Van 2012", "Mitsubishi Lancer Sedan 2012",
    "Nissan Leaf Hatchback 2012", "Nissan NV Passenger Van 2012", "Nissan Juke Hatchback 2012",
    "Nissan 240SX Coupe 1998", "Plymouth Neon Coupe 1999", "Porsche Panamera Sedan 2012",
    "Ram C/V Cargo Van Minivan 2012", "Rolls-Royce Phantom Drophead Coupe Convertible 2012",
    "Rolls-Royce Ghost Sedan 2012", "Rolls-Royce Phantom Sedan 2012", "Scion xD Hatchback 2012",
    "Spyker C8 Convertible 2009", "Spyker C8 Coupe 2009", "Suzuki Aerio Sedan 2007", "Suzuki Kizashi Sedan 2012",
    "Suzuki SX4 Hatchback 2012", "Suzuki SX4 Sedan 2012", "Tesla Model S Sedan 2012", "Toyota Sequoia SUV 2012",
    "Toyota Camry Sedan 2012", "Toyota Corolla Sedan 2012", "Toyota 4Runner SUV 2012",
    "Volkswagen Golf Hatchback 2012", "Volkswagen Golf Hatchback 1991", "Volkswagen Beetle Hatchback 2012",
    "Volvo C30 Hatchback 2012", "Volvo 240 Sedan 1993", "Volvo XC90 SUV 2007", "smart fortwo Convertible 2012",
]  # fmt: skip

CAR_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _matlab_uint(value: int) -> np.ndarray:
    # MATLAB stores each struct field in the smallest type that fits: uint8 or uint16 vary per entry.
    return np.array([[value]], dtype=np.uint8 if value < 256 else np.uint16)


def save_car_annotations(path: Path, annotations: Sequence[tuple], fields: Sequence[str] = CAR_FIELDS) -> None:
    """annotations: (fname, class, (x1, y1, x2, y2)) -> a 1xN MATLAB struct array like the devkit's."""
    records = np.empty((1, len(annotations)), dtype=[(f, object) for f in fields])
    for i, (fname, class_id, box) in enumerate(annotations):
        values = {"bbox_x1": box[0], "bbox_y1": box[1], "bbox_x2": box[2], "bbox_y2": box[3], "class": class_id}
        records[0, i] = tuple(np.array([fname]) if f == "fname" else _matlab_uint(values[f]) for f in fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"annotations": records})


def save_car_meta(path: Path, class_names: Sequence[str] = CARS196_CLASS_NAMES) -> None:
    cell = np.empty((1, len(class_names)), dtype=object)
    for i, name in enumerate(class_names):
        cell[0, i] = np.array([name])
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"class_names": cell})


# (width, height) of the generated car images; boxes are drawn inside them.
CAR_IMAGE_SIZE = (64, 48)
FIRST_TRAIN_ANNOTATION = ("00001.jpg", 14, (39, 116, 569, 375))  # the devkit's first entry, image 600x400


def default_car_annotations() -> tuple[list[tuple], list[tuple]]:
    """One train and one test image per class (train 00001.jpg is the devkit's first entry), plus a second
    train image for classes 1, 2 and 99, so that the counts differ between protocols:
    metric 198 train / 197 validation, stanford 199 / 196."""
    train = [FIRST_TRAIN_ANNOTATION]
    for class_id in range(1, 197):
        if class_id != 14:
            train.append((f"{len(train) + 1:05d}.jpg", class_id, (1 + class_id % 7, 2, 60, 40 + class_id % 8)))
    for class_id, box in ((1, (0, 0, 64, 48)), (2, (5, 5, 20, 30)), (99, (10, 1, 11, 2))):
        train.append((f"{len(train) + 1:05d}.jpg", class_id, box))
    test = [
        (f"{i + 1:05d}.jpg", class_id, (3, 4, 50 + class_id % 10, 44)) for i, class_id in enumerate(range(196, 0, -1))
    ]
    return train, test


def write_cars_tree(
    root: Path,
    layout: str = "original",
    train: Sequence[tuple] | None = None,
    test: Sequence[tuple] | None = None,
    class_names: Sequence[str] = CARS196_CLASS_NAMES,
) -> Path:
    """layout: 'original' (devkit/ + cars_test_annos_withlabels.mat at the root), 'torchvision'
    (the same inside ROOT/stanford_cars/) or 'kaggle' (cars_train/cars_train/*.jpg, .mat files at the root)."""
    default_train, default_test = default_car_annotations()
    train = default_train if train is None else train
    test = default_test if test is None else test
    base = root / "stanford_cars" if layout == "torchvision" else root
    small = jpeg_bytes(*CAR_IMAGE_SIZE, seed=1)
    large = jpeg_bytes(600, 400, seed=2)
    for folder, folder_annotations in (("cars_train", train), ("cars_test", test)):
        image_dir = base / folder / folder if layout == "kaggle" else base / folder
        for fname, _, box in folder_annotations:
            write(image_dir / fname, large if box[2] > CAR_IMAGE_SIZE[0] or box[3] > CAR_IMAGE_SIZE[1] else small)
    mat_dir = base if layout == "kaggle" else base / "devkit"
    save_car_meta(mat_dir / "cars_meta.mat", class_names)
    save_car_annotations(mat_dir / "cars_train_annos.mat", train)
    save_car_annotations(base / "cars_test_annos_withlabels.mat", test)
    if layout != "kaggle":  # the devkit's unlabelled test file, which the converter must not use
        save_car_annotations(base / "devkit" / "cars_test_annos.mat", test, [f for f in CAR_FIELDS if f != "class"])
    return root


# ------------------------------------------------------------------------------------------------ fruits

FRUIT_CLASSES = ["apple", "bell pepper", "jalepeno", "raddish", "soy beans", "watermelon"]


def write_fruits_tree(
    root: Path, classes: Sequence[str] = FRUIT_CLASSES, n_train: int = 3, n_held_out: int = 2
) -> Path:
    """train/validation/test/<class>/Image_<n>.jpg with gaps in the numbering; every image distinct."""
    seed = 0
    for folder, count in (("train", n_train), ("validation", n_held_out), ("test", n_held_out)):
        for class_name in classes:
            for k in range(count):
                seed += 1
                write(root / folder / class_name / f"Image_{2 * k + 1}.jpg", jpeg_bytes(seed=seed))
    return root


def copy_file(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
