"""Image transforms built from `configs/transforms/*.yaml` (keys `train:` and `val:`).

OML's ``ImageBaseDataset`` accepts only ``albumentations.Compose`` (images read with cv2 as RGB uint8 HxWx3) or a
torchvision *v1* ``Compose`` (PIL images); both return a float32 CxHxW tensor here. OML's own albumentations
augmentation set refuses albumentations > 1.3.1, so the albumentations 2 pipelines are written here.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import albumentations as albu
import cv2
import torchvision.transforms as tv
from albumentations.pytorch import ToTensorV2
from oml.const import MEAN, STD

TNorm = Sequence[float]


def _norm(values: TNorm, name: str) -> Tuple[float, float, float]:
    values = tuple(float(v) for v in values)  # Hydra passes a ListConfig
    if len(values) != 3:
        raise ValueError(f"`{name}` needs 3 values (R, G, B), got {values}")
    return values


def _check_size(height: int, width: int) -> None:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")


def _check_p(**probabilities: float) -> None:
    for name, p in probabilities.items():
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"`{name}` is a probability in [0, 1], got {p}")


def reid_train(
    height: int = 256,
    width: int = 128,
    flip_p: float = 0.5,
    pad: int = 10,
    erasing_p: float = 0.5,
    erasing_scale: Sequence[float] = (0.02, 0.4),
    erasing_ratio: Sequence[float] = (0.3, 3.3),
    mean: TNorm = MEAN,
    std: TNorm = STD,
) -> albu.Compose:
    """Re-ID bag of tricks (Luo et al. 2019): resize, horizontal flip, zero-pad `pad` + random crop back to size,
    normalise, random erasing (applied after normalising with fill 0, i.e. the mean colour), to tensor."""
    _check_size(height, width)
    _check_p(flip_p=flip_p, erasing_p=erasing_p)
    steps = [albu.Resize(height=height, width=width), albu.HorizontalFlip(p=flip_p)]
    if pad > 0:
        steps += [
            albu.PadIfNeeded(
                min_height=height + 2 * pad, min_width=width + 2 * pad, border_mode=cv2.BORDER_CONSTANT, fill=0
            ),
            albu.RandomCrop(height=height, width=width),
        ]
    steps += [
        albu.Normalize(mean=_norm(mean, "mean"), std=_norm(std, "std")),
        albu.Erasing(scale=tuple(erasing_scale), ratio=tuple(erasing_ratio), fill=0, p=erasing_p),
        ToTensorV2(),
    ]
    return albu.Compose(steps)


def reid_val(height: int = 256, width: int = 128, mean: TNorm = MEAN, std: TNorm = STD) -> albu.Compose:
    """Resize, normalise, to tensor."""
    _check_size(height, width)
    return albu.Compose(
        [
            albu.Resize(height=height, width=width),
            albu.Normalize(mean=_norm(mean, "mean"), std=_norm(std, "std")),
            ToTensorV2(),
        ]
    )


def retrieval_train(
    height: int = 224,
    width: int = 224,
    scale_min: float = 0.2,
    flip_p: float = 0.5,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.0,
    jitter_p: float = 0.5,
    mean: TNorm = MEAN,
    std: TNorm = STD,
) -> albu.Compose:
    """General retrieval (products, cars, fruit): random resized crop (area fraction in [scale_min, 1]), horizontal
    flip, colour jitter, normalise, to tensor. Hue stays 0 by default: colour often tells classes apart."""
    _check_size(height, width)
    _check_p(flip_p=flip_p, jitter_p=jitter_p)
    if not 0.0 < scale_min <= 1.0:
        raise ValueError(f"`scale_min` is an area fraction in (0, 1], got {scale_min}")
    return albu.Compose(
        [
            albu.RandomResizedCrop(size=(height, width), scale=(scale_min, 1.0)),
            albu.HorizontalFlip(p=flip_p),
            albu.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=jitter_p),
            albu.Normalize(mean=_norm(mean, "mean"), std=_norm(std, "std")),
            ToTensorV2(),
        ]
    )


def _val_resize(height: int, width: int, crop_fraction: float) -> Tuple[int, int]:
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"`crop_fraction` must be in (0, 1] (1 = plain resize, no crop), got {crop_fraction}")
    return round(height / crop_fraction), round(width / crop_fraction)


def retrieval_val(
    height: int = 224, width: int = 224, crop_fraction: float = 0.875, mean: TNorm = MEAN, std: TNorm = STD
) -> albu.Compose:
    """Resize to size / crop_fraction, center crop to size (ImageNet convention 256 -> 224); crop_fraction=1 is a
    plain resize (nothing cut off)."""
    _check_size(height, width)
    resize_h, resize_w = _val_resize(height, width, crop_fraction)
    return albu.Compose(
        [
            albu.Resize(height=resize_h, width=resize_w),
            albu.CenterCrop(height=height, width=width),
            albu.Normalize(mean=_norm(mean, "mean"), std=_norm(std, "std")),
            ToTensorV2(),
        ]
    )


def torchvision_train(
    height: int = 224,
    width: int = 224,
    scale_min: float = 0.2,
    flip_p: float = 0.5,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.0,
    erasing_p: float = 0.0,
    mean: TNorm = MEAN,
    std: TNorm = STD,
) -> tv.Compose:
    """`retrieval_train` with torchvision v1 transforms (PIL input), plus optional random erasing."""
    _check_size(height, width)
    _check_p(flip_p=flip_p, erasing_p=erasing_p)
    steps = [
        tv.RandomResizedCrop((height, width), scale=(scale_min, 1.0), antialias=True),
        tv.RandomHorizontalFlip(p=flip_p),
        tv.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue),
        tv.ToTensor(),
        tv.Normalize(mean=_norm(mean, "mean"), std=_norm(std, "std")),
    ]
    if erasing_p > 0:
        steps.append(tv.RandomErasing(p=erasing_p, value=0))
    return tv.Compose(steps)


def torchvision_val(
    height: int = 224, width: int = 224, crop_fraction: float = 0.875, mean: TNorm = MEAN, std: TNorm = STD
) -> tv.Compose:
    """`retrieval_val` with torchvision v1 transforms (PIL input)."""
    _check_size(height, width)
    resize_h, resize_w = _val_resize(height, width, crop_fraction)
    return tv.Compose(
        [
            tv.Resize((resize_h, resize_w), antialias=True),
            tv.CenterCrop((height, width)),
            tv.ToTensor(),
            tv.Normalize(mean=_norm(mean, "mean"), std=_norm(std, "std")),
        ]
    )


__all__ = ["reid_train", "reid_val", "retrieval_train", "retrieval_val", "torchvision_train", "torchvision_val"]
