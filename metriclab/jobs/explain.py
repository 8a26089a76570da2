"""GradCAM for retrieval: what in a query and in its retrieved images makes them close.

    python scripts/explain.py run=<MLflow run id of a training or validation run>   # its checkpoint, data, transforms
    python scripts/explain.py ckpt=outputs/train/<run>/checkpoints/best.ckpt dataset.root=/data/x transforms=...

For the worst validation queries (lowest AP, the rule of the worst-query grids), grad-cam's GradCAM is run with a
similarity target (the embedding-model recipe of the `grad-cam` package): the query's map explains its similarity
to its top-1 retrieved image, each retrieved image's map explains its similarity to the query. Similarity =
cosine similarity or minus the squared euclidean distance, following `evaluation.distance`. The overlays are
saved as one grid (`<run dir>/gradcam/gradcam_worst_queries.png` + a CSV of what each tile is) and logged to the
job's own MLflow run, tagged `explained_run_id` when `run=` was given.
"""
from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from metriclab.core.atomic import atomic_savefig, write_csv_atomic
from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import build_validation_data, class_names, read_dataset_csv
from metriclab.evaluation.pictures import evaluate_validation, plt, select_worst_queries, style_tile
from metriclab.jobs.predict import embed_dataset, list_failures, load_extractor
from metriclab.tracking.run import tracked_run

#: Config groups taken from the explained run (unless given on the command line): they define its worst queries.
RUN_GROUPS = ("dataset", "transforms", "evaluation", "extractor")


class SimilarityTarget:
    """grad-cam target: similarity of one model output [D] to a fixed embedding (grad-cam's embedding tutorial)."""

    def __init__(self, embedding: torch.Tensor, distance: str = "cosine"):
        if distance not in ("cosine", "euclidean"):
            raise ConfigError(f"`evaluation.distance={distance}` is not supported; use euclidean or cosine")
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


def resolve_target_layer(model: torch.nn.Module, name: Optional[str], image_hw: Tuple[int, int]):
    """(layer, reshape_transform): `name` from named_modules, or the last conv stage (ResNet) / last block (ViT)."""
    backbone = getattr(model, "model", model)
    is_vit = hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")
    if name:
        modules = dict(model.named_modules())
        if name not in modules:
            hint = [n for n in modules if n.count(".") <= 2][-8:]
            raise ConfigError(f"`target_layer={name}` is not a module of {type(model).__name__}; e.g. {hint}")
        layer = modules[name]
    elif is_vit:
        layer = backbone.blocks[-1].norm1
    elif all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        # ResNet stages have strides 4, 8, 16, 32: the deepest whose map is at least 4x4 (224 px: layer4, 7x7;
        # 32 px digits: layer2) -- a 1x1 map would give a flat CAM
        stage = next((i for i in (4, 3, 2) if min(image_hw) / 2 ** (i + 1) >= 4), 1)
        layer = getattr(backbone, f"layer{stage}")
    else:
        raise ConfigError(f"no default GradCAM layer for {type(model).__name__}: set `target_layer=<module name>` "
                          f"(a layer whose output is [B, C, H, W])")
    reshape = None
    if is_vit:
        patch = backbone.patch_embed.patch_size
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        reshape = _vit_reshape(image_hw[0], image_hw[1], patch)
    return layer, reshape


def similarity_cams(model: torch.nn.Module, images: torch.Tensor, target_embeddings: torch.Tensor,
                    distance: str = "cosine", target_layer: Optional[str] = None) -> np.ndarray:
    """GradCAM maps [N, H, W] in [0, 1] (H, W = the input's): image i explained by its similarity to embedding i."""
    from pytorch_grad_cam import GradCAM

    if images.ndim != 4 or target_embeddings.ndim != 2 or len(images) != len(target_embeddings):
        raise ValueError(f"need images [N, C, H, W] and target embeddings [N, D], got {tuple(images.shape)} and "
                         f"{tuple(target_embeddings.shape)}")
    layer, reshape = resolve_target_layer(model, target_layer, tuple(images.shape[-2:]))
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
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)


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


# ----------------------------------------------------------------------------------------------------------------------
# which run, which checkpoint


def _user_set(group: str, overrides: Sequence[str]) -> bool:
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return any(k == group or k.startswith(group + ".") for k in keys)


def _run_config(client, run_id: str) -> Tuple[DictConfig, Dict[str, str]]:
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise ConfigError(f"run={run_id} is not in the MLflow store {client.tracking_uri}: pass the run id shown in "
                          f"`make ui` / `make report` (and the same logger.tracking_uri)") from e
    tags = dict(run.data.tags)
    local = Path(tags["run_dir"]) / "config.yaml" if tags.get("run_dir") else None
    if local is not None and local.is_file():
        return OmegaConf.load(local), tags
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return OmegaConf.load(client.download_artifacts(run_id, "config/config.yaml", tmp)), tags
    except Exception as e:
        raise ConfigError(f"run={run_id} has no config: neither {local} nor the artifact config/config.yaml "
                          f"exists; pass ckpt=, dataset.root= and transforms= instead of run=") from e


def resolve_explained_run(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """A copy of cfg with the checkpoint and the run's dataset/transforms/evaluation/extractor filled in."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # one timestamp, one run dir
    run_id = cfg.get("run")
    if run_id:
        from mlflow.tracking import MlflowClient

        uri = str(cfg.logger.get("tracking_uri")) if cfg.get("logger") and "tracking_uri" in cfg.logger else None
        if not uri:
            raise ConfigError("run= needs an MLflow store: use logger=mlflow (or set MLFLOW_TRACKING_URI)")
        run_cfg, tags = _run_config(MlflowClient(uri), str(run_id))
        with open_dict(cfg):
            for group in RUN_GROUPS:
                if group in run_cfg and not _user_set(group, overrides):
                    cfg[group] = run_cfg[group]
            if not cfg.get("ckpt"):
                if run_cfg.get("task") == "train":
                    cfg.ckpt = str(Path(tags.get("run_dir") or run_cfg.paths.run_dir) / "checkpoints" / "best.ckpt")
                else:  # a validation run: its checkpoint (null = the extractor's own weights)
                    cfg.ckpt = run_cfg.get("ckpt")
                    cfg.extractor_from_ckpt = run_cfg.get("extractor_from_ckpt", True)
    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError("`dataset.root` is not set: pass run=<MLflow run id> (its dataset is used) or "
                          "dataset.root=<converted dataset folder>")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# the job


def _flat(cam: np.ndarray) -> str:
    """GradCAM keeps only positive evidence: a map that is 0 everywhere says no region raises the similarity."""
    return ", flat map" if float(cam.max()) == 0.0 else ""


def _draw_grid(rows: List[Dict[str, Any]], out_png: Path, title: str) -> None:
    n_cols = max(len(r["tiles"]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.0 * n_cols, 2.4 * len(rows) + 0.7), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row["tiles"]):
                continue
            tile = row["tiles"][c]
            ax.axis("on")
            style_tile(ax, tile["overlay"], tile["caption"], tile["color"])
    fig.suptitle(textwrap.fill(title, width=32 * n_cols), fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=100)
    plt.close(fig)


def explain(cfg: DictConfig) -> Dict[str, Any]:
    """GradCAM grid of the worst queries; returns run dir, files, the maps and the tracker run id."""
    run_dir, run_name, overrides = job_identity(cfg)
    cfg = resolve_explained_run(cfg, overrides)
    n_queries, top_k = int(cfg.n_queries), int(cfg.top_k)
    if n_queries < 1 or top_k < 1:
        raise ConfigError(f"`n_queries` and `top_k` must be >= 1, got {n_queries} and {top_k}")
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    with open_dict(cfg):  # exact ranking (AP needs it), and enough neighbours kept for the grid
        cfg.evaluation.backend = "exact"
        cfg.evaluation.grid_top_k = max(int(cfg.evaluation.grid_top_k), top_k)
    distance = str(cfg.evaluation.distance)

    with tracked_run(cfg, run_dir, run_name, overrides) as tracked:
        if cfg.get("run") and tracked.mlflow_client is not None:
            tracked.mlflow_client.set_tag(tracked.mlflow_run_id, "explained_run_id", str(cfg.run))
        root = Path(cfg.dataset.root)
        transform = build(cfg.transforms.val, "transforms.val")
        val_data = build_validation_data(read_dataset_csv(root, cfg.dataset.csv), root, transform,
                                         cfg.dataset.cache_size)
        extractor = load_extractor(cfg)
        model = extractor.model
        emb, ok_ids, failed = embed_dataset(model, val_data.dataset, int(cfg.batch_size), int(cfg.num_workers))
        if failed:
            raise ConfigError(f"{len(failed)} validation image(s) cannot be read: "
                              f"{list_failures(failed, [str(root / p) for p in val_data.paths])}")
        embeddings = torch.from_numpy(emb)
        report = evaluate_validation(embeddings, val_data, cfg.evaluation)
        worst = select_worst_queries(report, n_queries)
        if worst.empty:
            raise ConfigError("no validation query has a true match in the gallery: nothing to explain")

        q_rows, g_rows = np.flatnonzero(val_data.is_query), np.flatnonzero(val_data.is_gallery)
        labels, paths = val_data.labels, val_data.paths
        names = class_names(val_data.df)
        grid_rows, table, all_maps = [], [], []
        for _, q in worst.iterrows():
            qi = int(q["query_index"])
            q_row = int(q_rows[qi])
            retrieved = [(int(g_rows[j]), float(d)) for j, d in
                         zip(report.topk_ids[qi][:top_k], report.topk_distances[qi][:top_k]) if j >= 0]
            rows = [q_row] + [g for g, _ in retrieved]
            images = torch.stack([val_data.dataset[r]["input_tensors"] for r in rows])  # moved by grad-cam
            # the query is explained by its top-1 neighbour, every neighbour by the query
            targets = torch.stack([embeddings[rows[1]]] + [embeddings[q_row]] * len(retrieved))
            maps = similarity_cams(model, images, targets, distance, cfg.get("target_layer"))
            all_maps.append(maps)
            tiles = [{"overlay": overlay(tensor_to_image(images[0], transform), maps[0]), "color": "blue",
                      "caption": f"QUERY {names[q_row]}\n{Path(paths[q_row]).name}\nAP {q['ap']:.3f}{_flat(maps[0])}"}]
            table.append({"query_index": qi, "position": 0, "path": paths[q_row], "label": int(labels[q_row]),
                          "distance": 0.0, "explained_by": f"similarity to #1 {paths[rows[1]]}"})
            for c, (g_row, dist) in enumerate(retrieved, start=1):
                ok = labels[g_row] == labels[q_row]
                tiles.append({"overlay": overlay(tensor_to_image(images[c], transform), maps[c]),
                              "color": "green" if ok else "red",
                              "caption": f"#{c} {names[g_row]}\n{Path(paths[g_row]).name}\nd={dist:.3f}"
                                         f"{_flat(maps[c])}"})
                table.append({"query_index": qi, "position": c, "path": paths[g_row], "label": int(labels[g_row]),
                              "distance": dist, "explained_by": "similarity to the query"})
            grid_rows.append({"tiles": tiles})

        out_dir = run_dir / "gradcam"
        png, csv = out_dir / "gradcam_worst_queries.png", out_dir / "gradcam_worst_queries.csv"
        source = f"run {cfg.run}" if cfg.get("run") else f"ckpt {cfg.ckpt}"
        _draw_grid(grid_rows, png, f"GradCAM ({distance} similarity) of the {len(grid_rows)} worst queries by AP, "
                                   f"{source}. Query: map of its similarity to #1; #k: map of its similarity to "
                                   f"the query. Green = same label, red = different")
        write_csv_atomic(pd.DataFrame(table), csv)
        tracked.log_artifact(png, "gradcam")
        tracked.log_artifact(csv, "gradcam")
        print(f"\n{run_name}: GradCAM of {len(grid_rows)} worst queries x {top_k} retrieved -> {png}")
        return {"run_dir": run_dir, "png": png, "csv": csv, "maps": all_maps, "worst": worst,
                "mlflow_run_id": tracked.mlflow_run_id, "ckpt": cfg.get("ckpt")}


__all__ = ["SimilarityTarget", "explain", "overlay", "resolve_explained_run", "resolve_target_layer",
           "similarity_cams", "tensor_to_image"]
