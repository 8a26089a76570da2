"""Inference speed of the extractor configs a user would pick first, on this CPU: parameters, embedding size, input
size (what the config states; timm: the arch's pretrained input) and images/s at that size.

Random init (`extractor.weights=null`: same architecture, no download), eval mode, `torch.inference_mode`, one
warm-up batch each, then the median over `--repeats` timed batches of `--batch` images, taken round robin over the
configs so that other load on the machine spreads over all of them.

    python bench/bench_extractors.py                                  # the default list, batch 8, 2 threads
    python bench/bench_extractors.py --configs vits16_dino timm:convnext_tiny --repeats 9
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from machine import cpu_model  # noqa: E402  (bench/machine.py, beside this script)
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from metriclab.models.extractors import build_extractor  # noqa: E402

CONFIGS = REPO / "configs" / "extractor"
#: `name` = configs/extractor/<name>.yaml; `timm:<arch>` = extractor=timm extractor.arch=<arch>
DEFAULT = ["resnet18_imagenet1k_v1", "resnet50_imagenet1k_v1", "vits16_dino", "vits14_dinov2", "vits14_reg_dinov2",
           "vitb14_reg_dinov2", "vits16_sop", "sber_vitb32_224", "openai_vitb16_224", "vitb32_unicom",
           "timm:resnet50", "timm:convnext_tiny", "timm:efficientnet_b0"]
STATED = re.compile(r"^# embedding size: (\d+) \| input size: (\d+)x(\d+) ", re.MULTILINE)


def load(name: str) -> Tuple[torch.nn.Module, Tuple[int, int]]:
    """The extractor (random init) and its input size (H, W)."""
    if name.startswith("timm:"):
        node = OmegaConf.load(CONFIGS / "timm.yaml")
        node.arch = name.split(":", 1)[1]
    else:
        node = OmegaConf.load(CONFIGS / f"{name}.yaml")
    node.weights = None  # build_extractor drops the training keys (freeze_bn, trainable)
    torch.manual_seed(0)
    model = build_extractor(node).eval()
    if name.startswith("timm:"):
        hw = tuple(model.input_size[1:])
    else:
        match = STATED.search((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
        hw = (int(match[2]), int(match[3])) if match else (224, 224)
    return model, (int(hw[0]), int(hw[1]))


def batch_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: load(name) for name in args.configs}
    inputs = {name: torch.rand(args.batch, 3, *hw, generator=torch.Generator().manual_seed(0))
              for name, (_, hw) in models.items()}
    times: Dict[str, List[float]] = {name: [] for name in models}
    for name, (model, _) in models.items():  # warm-up
        batch_seconds(model, inputs[name])
    for _ in range(args.repeats):  # round robin: a busy spell on the machine hits every config alike
        for name, (model, _) in models.items():
            times[name].append(batch_seconds(model, inputs[name]))
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, batch {args.batch}, median of "
          f"{args.repeats} batches (round robin over the configs) after one warm-up, random init; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| config | parameters | embedding size | input size | images/s |")
    print("|---|---:|---:|---:|---:|")
    for name, (model, hw) in models.items():
        n_params = sum(p.numel() for p in model.parameters())
        speed = args.batch / statistics.median(times[name])
        label = f"`extractor=timm extractor.arch={name[5:]}`" if name.startswith("timm:") else f"`{name}`"
        print(f"| {label} | {n_params / 1e6:.1f}M | {model.feat_dim} | {hw[0]}x{hw[1]} | {speed:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
