"""GradCAM for retrieval: which regions of an image raise its similarity to a target embedding.

grad-cam's GradCAM is run with a similarity target (the embedding-model recipe of the `grad-cam` package):
similarity = cosine similarity or minus the squared euclidean distance, following the evaluation distance.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch

from metriclab.core.constants import DISTANCES
from metriclab.core.errors import ConfigError


class SimilarityTarget:
    """grad-cam target: similarity of one model output [D] to a fixed embedding (grad-cam's embedding tutorial)."""

    def __init__(self, embedding: torch.Tensor, distance: str = "cosine"):
        if distance not in DISTANCES:
            raise ConfigError(f"`evaluation.distance={distance}` is not supported; use one of {', '.join(DISTANCES)}")
        self.embedding = embedding.detach().float()
        self.distance = distance

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        target = self.embedding.to(output.device)
        if self.distance == "cosine":
            return torch.nn.functional.cosine_similarity(output, target, dim=0)
        return -((output - target) ** 2).sum()  # squared: smooth at 0; the map is rescaled to [0, 1] anyway


def _vit_reshape(height: int, width: int, patch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ViT tokens [B, 1 (+registers) + h*w, C] -> [B, C, h, w], the patch tokens being the last h*w."""
    h, w = height // patch, width // patch

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, -h * w:, :].reshape(tokens.size(0), h, w, tokens.size(2))
        return grid.permute(0, 3, 1, 2)

    return reshape


def _default_layer(model: torch.nn.Module, backbone: Any, is_vit: bool,
                   image_hw: Tuple[int, int]) -> torch.nn.Module:
    if is_vit:
        return backbone.blocks[-1].norm1
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        # ResNet stages have strides 4, 8, 16, 32: the deepest whose map is at least 4x4 (224 px: layer4, 7x7;
        # 32 px digits: layer2) -- a 1x1 map would give a flat CAM
        stage = next((i for i in (4, 3, 2) if min(image_hw) / 2 ** (i + 1) >= 4), 1)
        return getattr(backbone, f"layer{stage}")
    raise ConfigError(f"no default GradCAM layer for {type(model).__name__}: set `target_layer=<module name>` "
                      f"(a layer whose output is [B, C, H, W])")


def resolve_target_layer(model: torch.nn.Module, name: Optional[str], image_hw: Tuple[int, int]):
    """(layer, reshape_transform): `name` from named_modules, or the last conv stage (ResNet) / last block (ViT)."""
    backbone: Any = getattr(model, "model", model)  # OML extractors keep the network as `.model`
    is_vit = hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")
    if name:
        modules = dict(model.named_modules())
        if name not in modules:
            hint = [n for n in modules if n.count(".") <= 2][-8:]
            raise ConfigError(f"`target_layer={name}` is not a module of {type(model).__name__}; e.g. {hint}")
        layer = modules[name]
    else:
        layer = _default_layer(model, backbone, is_vit, image_hw)
    reshape = None
    if is_vit:
        patch = backbone.patch_embed.patch_size
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        reshape = _vit_reshape(image_hw[0], image_hw[1], patch)
    return layer, reshape


def similarity_cams(model: torch.nn.Module, images: torch.Tensor, target_embeddings: torch.Tensor,
                    distance: str = "cosine", target_layer: Optional[str] = None) -> np.ndarray:
    """GradCAM maps [N, H, W] (H, W = the input's): image i explained by its similarity to embedding i. grad-cam
    scales each map to [0, 1] (all 0 when nothing raises the similarity). Runs in eval mode; the model's mode,
    requires_grad flags and gradients are left as they were."""
    from pytorch_grad_cam import GradCAM

    if images.ndim != 4 or target_embeddings.ndim != 2 or len(images) != len(target_embeddings):
        raise ValueError(f"need images [N, C, H, W] and target embeddings [N, D], got {tuple(images.shape)} and "
                         f"{tuple(target_embeddings.shape)}")
    layer, reshape = resolve_target_layer(model, target_layer, (int(images.shape[-2]), int(images.shape[-1])))
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # frozen layers would cut the gradient to the target layer
        p.requires_grad_(True)
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=images, targets=[SimilarityTarget(e, distance) for e in target_embeddings])
    finally:
        cam.activations_and_grads.release()  # not `with`: grad-cam's __exit__ swallows IndexError
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32)


def _normalisation(transform: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(mean, std) of the Normalize step of an albumentations or torchvision Compose, if there is one."""
    for step in getattr(transform, "transforms", []) or []:
        if type(step).__name__ == "Normalize" and getattr(step, "mean", None) is not None:
            return np.asarray(step.mean, dtype=np.float32), np.asarray(step.std, dtype=np.float32)
    return None


def tensor_to_image(tensor: torch.Tensor, transform: Any) -> np.ndarray:
    """The model's input [C, H, W] back to an RGB float image [H, W, 3] in [0, 1] (what the CAM is aligned with)."""
    img = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    norm = _normalisation(transform)
    if norm is not None:
        img = img * norm[1] + norm[0]
    else:  # unknown normalisation: stretch to [0, 1]
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.clip(img, 0.0, 1.0)


def overlay(image01: np.ndarray, cam: np.ndarray) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image01.astype(np.float32), cam, use_rgb=True, image_weight=0.5)


__all__ = ["SimilarityTarget", "overlay", "resolve_target_layer", "similarity_cams", "tensor_to_image"]
