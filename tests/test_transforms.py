"""Transforms: every YAML builds (train and val), shapes/dtypes, hand-computed normalisation, val determinism,
train randomness, and OML's ImageBaseDataset accepts each one."""
import albumentations as albu
import numpy as np
import pytest
import torch
import torchvision.transforms as tv
from omegaconf import OmegaConf
from oml.const import MEAN, STD
from oml.datasets.images import ImageBaseDataset
from PIL import Image

from metriclab.core.config import build
from metriclab.core.paths import CONFIGS_DIR
from metriclab.data.transforms import reid_train, reid_val, retrieval_train, retrieval_val, torchvision_train

SIZES = {"reid": (256, 128), "retrieval": (224, 224), "torchvision": (224, 224)}


def _image(h=96, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _apply(transform, image):
    if isinstance(transform, albu.Compose):
        return transform(image=image)["image"]
    return transform(Image.fromarray(image))


def _load(name, overrides=()):
    cfg = OmegaConf.load(CONFIGS_DIR / "transforms" / f"{name}.yaml")
    cfg.merge_with_dotlist(list(overrides))
    return build(cfg.train, "transforms.train"), build(cfg.val, "transforms.val")


@pytest.mark.parametrize("name", list(SIZES))
def test_yaml_builds_train_and_val_with_the_right_output(name):
    train, val = _load(name)
    compose_type = tv.Compose if name == "torchvision" else albu.Compose
    assert type(train) is compose_type and type(val) is compose_type  # v1 Compose: OML rejects torchvision v2
    for transform in (train, val):
        out = _apply(transform, _image())
        assert out.dtype == torch.float32 and tuple(out.shape) == (3, *SIZES[name])


@pytest.mark.parametrize("name", list(SIZES))
def test_train_size_override_reaches_val(name):
    train, val = _load(name, ["train.height=64", "train.width=48"])
    for transform in (train, val):
        assert tuple(_apply(transform, _image()).shape) == (3, 64, 48)


@pytest.mark.parametrize("name", list(SIZES))
def test_val_is_deterministic_and_train_is_not(name):
    train, val = _load(name)
    if isinstance(train, albu.Compose):
        train.set_random_seed(0)
    torch.manual_seed(0)
    image = _image()
    assert torch.equal(_apply(val, image), _apply(val, image))
    draws = [_apply(train, image) for _ in range(4)]
    assert all(not torch.equal(d, _apply(val, image)) for d in draws)
    assert len({d.sum().item() for d in draws}) == 4  # four different augmentations


@pytest.mark.parametrize("name", list(SIZES))
def test_val_normalises_a_constant_image_to_the_hand_value(name):
    _, val = _load(name)
    pixel = np.array([200, 100, 50], dtype=np.uint8)
    out = _apply(val, np.broadcast_to(pixel, (40, 30, 3)).copy())
    expected = (pixel / 255.0 - np.array(MEAN)) / np.array(STD)
    for channel in range(3):
        assert out[channel].min().item() == pytest.approx(expected[channel], abs=1e-5)
        assert out[channel].max().item() == pytest.approx(expected[channel], abs=1e-5)


def test_reid_train_flip_is_an_exact_mirror_of_val():
    image = _image()
    flipped = reid_train(height=64, width=32, flip_p=1.0, pad=0, erasing_p=0.0)(image=image)["image"]
    plain = reid_val(height=64, width=32)(image=image)["image"]
    assert torch.equal(flipped, plain.flip(-1))


def test_reid_train_pad_crop_shifts_the_image():
    image = _image()
    train = reid_train(height=64, width=32, flip_p=0.0, pad=10, erasing_p=0.0)
    train.set_random_seed(3)
    plain = reid_val(height=64, width=32)(image=image)["image"]
    zero = (0 - np.array(MEAN)) / np.array(STD)  # a zero-padded pixel after normalisation
    for _ in range(5):
        out = train(image=image)["image"]
        # the output is the val image shifted by (dy, dx) in [-10, 10], zero padding filling the border
        matches = [(dy, dx) for dy in range(-10, 11) for dx in range(-10, 11)
                   if torch.equal(out[:, max(dy, 0):64 + min(dy, 0), max(dx, 0):32 + min(dx, 0)],
                                  plain[:, max(-dy, 0):64 - max(dy, 0), max(-dx, 0):32 - max(dx, 0)])]
        assert len(matches) == 1
        dy, dx = matches[0]
        if dy > 0:  # rows above the shifted image are padding
            padding = torch.tensor(zero, dtype=torch.float32)[:, None, None].expand(3, dy, 32)
            assert torch.allclose(out[:, :dy, :], padding)


def test_reid_train_erasing_fills_one_rectangle_with_zero():
    image = _image()
    train = reid_train(height=64, width=32, flip_p=0.0, pad=0, erasing_p=1.0)
    train.set_random_seed(0)
    out = train(image=image)["image"]
    plain = reid_val(height=64, width=32)(image=image)["image"]
    differs = (out != plain).any(dim=0)
    rows, cols = torch.nonzero(differs, as_tuple=True)
    assert len(rows) > 0
    box = out[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert torch.all(box == 0)  # erased = 0 after normalising = the mean colour
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 64 * 32 - 1 <= area <= 0.4 * 64 * 32 + 1


def test_retrieval_val_crop_fraction_one_is_a_plain_resize():
    image = _image(50, 50)
    resized = retrieval_val(height=32, width=32, crop_fraction=1.0)(image=image)["image"]
    reference = albu.Compose([albu.Resize(32, 32), albu.Normalize(mean=MEAN, std=STD)])(image=image)["image"]
    assert torch.allclose(resized, torch.from_numpy(reference).permute(2, 0, 1))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="`flip_p` is a probability"):
        reid_train(flip_p=1.5)
    with pytest.raises(ValueError, match="`crop_fraction` must be in"):
        retrieval_val(crop_fraction=1.2)
    with pytest.raises(ValueError, match="`scale_min` is an area fraction"):
        retrieval_train(scale_min=0.0)
    with pytest.raises(ValueError, match="`mean` needs 3 values"):
        torchvision_train(mean=[0.5])


# albumentations 2.0.8's from_dict warns about PadIfNeeded's own serialised `padding` key (its bug, harmless)
@pytest.mark.filterwarnings("ignore:Argument\\(s\\) 'padding' are not valid:UserWarning")
def test_albumentations_pipelines_serialise():
    """The pipeline may dump albu transforms as run artifacts (albu.to_dict / albu.save)."""
    for transform in (reid_train(), reid_val(), retrieval_train(), retrieval_val()):
        restored = albu.from_dict(albu.to_dict(transform))
        assert [type(t).__name__ for t in restored.transforms] == [type(t).__name__ for t in transform.transforms]
    for transform in (reid_val(), retrieval_val()):
        image = _image()
        assert torch.equal(_apply(albu.from_dict(albu.to_dict(transform)), image), _apply(transform, image))


@pytest.mark.parametrize("name", list(SIZES))
def test_oml_image_dataset_accepts_the_transforms(tmp_path, name):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(_image(70 + i, 50, seed=i)).save(paths[-1])
    _, val = _load(name, ["train.height=32", "train.width=32"])
    item = ImageBaseDataset(paths=paths, transform=val)[1]
    assert tuple(item["input_tensors"].shape) == (3, 32, 32) and item["input_tensors"].dtype == torch.float32
    # the dataset read the PNG as RGB (cv2 for albu, PIL for torchvision): same tensor as applying val by hand
    assert torch.allclose(item["input_tensors"], _apply(val, _image(71, 50, seed=1)), atol=1e-6)
