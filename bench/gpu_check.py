"""GPU readiness check: the market_bot recipe end to end on one CUDA GPU, with numbers for docs/benchmarks.md.

    .venv/bin/python bench/gpu_check.py [--steps 300] [--ids 400] [--out outputs/gpu_check/<timestamp>]
    .venv/bin/python bench/gpu_check.py --device cpu --steps 4 --ids 8      # the same pipeline on CPU: a smoke run

1. data: person-sized images (128x64, Market-1501's size) in the Market-1501-v15.09.15 layout, file names and
   folders as released (the tree of tests/converter_trees.py): `--ids` identities, the even ones train, the odd
   ones query/gallery, 6 cameras each, plus distractors (0000) and junk (-1) in the gallery. Each identity has its
   own clothes colours, build, pattern and bag; each camera its own background and lighting: learning is visible.
2. convert: converters/market1501.py (the standard single-query protocol) writes dataset.csv.
3. train: configs/market_bot.yaml through `metriclab.jobs.train.train` (what scripts/train.py runs), with
   `trainer=gpu` (16-mixed) and `channels_last=true`, `--steps` optimizer steps (the recipe's warm-up and lr drops
   scaled to the run's epochs), random init (no download: `--weights` to use a zoo key), validation of the
   untrained model first and once after training. A timing callback (torch.cuda.synchronize around each step)
   gives images/s over the steps after `--warmup`, data loading included; peak torch.cuda.max_memory_allocated.
4. validate: `metriclab.jobs.validate.validate` (scripts/validate.py) on the best checkpoint, timed.
5. export: `metriclab.jobs.export.export` (scripts/export.py): ONNX with its parity check (onnxruntime CPU vs
   PyTorch fp32 on the GPU-trained weights); with onnxruntime's CUDA provider installed, its parity too.
Then a markdown block ready to paste into docs/benchmarks.md, also written to <out>/gpu_check.md.

Everything goes under `--out` (default outputs/gpu_check/<timestamp>, which must be new or empty): data, run folders,
the MLflow store (paths.outputs_dir=<out>/outputs), the log of the jobs' own output (<out>/gpu_check.log). On a
machine without a CUDA GPU it prints one line and exits 0, unless `--device cpu`: then the same pipeline runs on
CPU with 32-true precision and tiny defaults (ResNet18, 64x32 inputs, 2 x 4 batches, no DataLoader workers: ResNet50
adds ~25 s on 2 cores, mostly its ONNX export and checkpoints; `--extractor resnet50` for it). A failure is one
line `gpu-check: error: <stage>: <message>` on stderr (traceback in <out>/traceback.txt), exit status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_model  # noqa: E402
from tests.converter_trees import write_market_tree  # noqa: E402  (the Market-1501 tree the converter tests use)

IMAGE_HEIGHT, IMAGE_WIDTH = 128, 64  # Market-1501's bounding boxes
CAMERAS = range(1, 7)
CONFIG = "market_bot"
#: the recipe's schedule (configs/market_bot.yaml: 120 epochs, warm-up 10, lr x 0.1 at 40 and 70), as fractions
RECIPE_EPOCHS, RECIPE_WARMUP, RECIPE_MILESTONES = 120, 10, (40, 70)
#: defaults per device: (extractor, input height, width, n_labels, n_instances, num_workers); cuda = the recipe's
DEVICE_DEFAULTS = {"cuda": ("resnet50", 256, 128, 16, 4, min(8, os.cpu_count() or 1)),
                   "cpu": ("resnet18", 64, 32, 2, 4, 0)}


class StageError(Exception):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {type(error).__name__}: {' '.join(str(error).split())[:500]}")


# ------------------------------------------------------------------------------------------------------------ data
def _traits(seed: int, pid: int) -> Dict[str, Any]:
    """What makes a person recognisable: clothes colours, build, shirt pattern, bag, skin, hair."""
    rng = np.random.default_rng([seed, pid, 1])
    return {"shirt": rng.integers(0, 256, 3), "shirt2": rng.integers(0, 256, 3), "trousers": rng.integers(0, 256, 3),
            "skin": np.array([230, 190, 160]) * rng.uniform(0.45, 1.0), "hair": rng.integers(0, 120, 3),
            "pattern": int(rng.integers(0, 4)), "width": rng.uniform(0.34, 0.56), "legs": rng.uniform(0.38, 0.46),
            "bag": int(rng.integers(0, 3)), "bag_colour": rng.integers(0, 256, 3)}


def _camera(seed: int, cam: int) -> Dict[str, Any]:
    rng = np.random.default_rng([seed, cam, 2])
    return {"top": rng.integers(40, 220, 3), "bottom": rng.integers(40, 220, 3), "light": rng.uniform(0.75, 1.2)}


def person_image(traits: Dict[str, Any], camera: Dict[str, Any], rng: np.random.Generator,
                 h: int = IMAGE_HEIGHT, w: int = IMAGE_WIDTH) -> np.ndarray:
    """One bounding box: the camera's background, the person drawn from `traits` with a random pose jitter."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (y / h)[..., None]
    img = camera["top"] * (1 - t) + camera["bottom"] * t  # background gradient of the camera
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    top = rng.uniform(0.02, 0.08) * h
    tall = rng.uniform(0.88, 0.97) * h - top
    half = traits["width"] * w / 2 * rng.uniform(0.92, 1.08)

    def paint(mask: np.ndarray, colour: Any) -> None:
        img[mask] = colour

    head_r = 0.075 * tall
    head_y = top + head_r
    legs_top = top + (1 - traits["legs"]) * tall
    torso = (np.abs(x - cx) <= half) & (y >= top + 2 * head_r) & (y < legs_top)
    paint(torso, traits["shirt"])
    pattern = traits["pattern"]
    if pattern == 1:  # horizontal stripes
        paint(torso & (((y - top) // max(2.0, 0.05 * tall)) % 2 == 0), traits["shirt2"])
    elif pattern == 2:  # a vertical band (jacket open)
        paint(torso & (np.abs(x - cx) < half * 0.3), traits["shirt2"])
    elif pattern == 3:  # a square logo
        ly = top + 2 * head_r + 0.1 * tall
        paint(torso & (np.abs(x - cx) < half * 0.4) & (np.abs(y - ly) < 0.06 * tall), traits["shirt2"])
    leg_w = half * 0.42
    for side in (-1, 1):
        paint((np.abs(x - (cx + side * half * 0.48)) <= leg_w) & (y >= legs_top) & (y < top + tall),
              traits["trousers"])
    paint((x - cx) ** 2 + (y - head_y) ** 2 <= head_r ** 2, traits["skin"])
    paint(((x - cx) ** 2 + (y - head_y + 0.4 * head_r) ** 2 <= (head_r * 0.95) ** 2) & (y < head_y - 0.3 * head_r),
          traits["hair"])
    if traits["bag"]:  # a bag on one side
        bx = cx + (1 if traits["bag"] == 1 else -1) * (half + 0.09 * w)
        paint((np.abs(x - bx) < 0.09 * w) & (np.abs(y - (legs_top - 0.02 * tall)) < 0.09 * tall),
              traits["bag_colour"])
    img = img * camera["light"] * rng.uniform(0.85, 1.15) + rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class MarketNames:
    train: List[str] = field(default_factory=list)
    query: List[str] = field(default_factory=list)
    gallery: List[str] = field(default_factory=list)


def market_names(n_ids: int, seed: int) -> MarketNames:
    """Market-1501 file names: even ids train (2 per camera), odd ids query (1 on each of 2 cameras) + gallery
    (2 per camera), then distractors (0000) and junk (-1) in the gallery."""
    rng = np.random.default_rng([seed, 3])
    names = MarketNames()
    frame = iter(range(1, 10**6))

    def name(pid: int, cam: int, box: int) -> str:
        return f"{pid:04d}_c{cam}s1_{next(frame):06d}_{box:02d}.jpg" if pid >= 0 else \
            f"-1_c{cam}s1_{next(frame):06d}_{box:02d}.jpg"

    for pid in range(1, n_ids + 1):
        if pid % 2 == 0:
            names.train += [name(pid, cam, k + 1) for cam in CAMERAS for k in range(2)]
        else:
            names.query += [name(pid, int(cam), 0) for cam in sorted(rng.choice(list(CAMERAS), 2, replace=False))]
            names.gallery += [name(pid, cam, k + 1) for cam in CAMERAS for k in range(2)]
    names.gallery += [name(0, k % 6 + 1, 2) for k in range(max(2, n_ids // 4))]
    names.gallery += [name(-1, k % 6 + 1, 3) for k in range(max(1, n_ids // 8))]
    return names


def write_market(root: Path, n_ids: int, seed: int) -> Dict[str, int]:
    """The tree (tests/converter_trees.py's layout), then every .jpg replaced by its generated image."""
    names = market_names(n_ids, seed)
    write_market_tree(root, names.train, names.query, names.gallery, image=b"")
    rng = np.random.default_rng([seed, 4])
    cameras = {cam: _camera(seed, cam) for cam in CAMERAS}
    for folder, files in (("bounding_box_train", names.train), ("query", names.query),
                          ("bounding_box_test", names.gallery)):
        for fname in files:
            pid_text, rest = fname.split("_", 1)
            pid, cam = int(pid_text), int(rest[1])
            # distractors and junk: a different random person every image
            traits = _traits(seed, pid) if pid > 0 else _traits(seed, 100_000 + int(rng.integers(1 << 30)))
            pixels = person_image(traits, cameras[cam], rng)
            if pid == -1:  # junk: a bad crop, mostly background
                pixels = np.roll(pixels, IMAGE_HEIGHT // 2, axis=0)
            Image.fromarray(pixels, "RGB").save(root / folder / fname, format="JPEG", quality=90)
    return {"train": len(names.train), "query": len(names.query), "gallery": len(names.gallery),
            "ids": n_ids}


# ------------------------------------------------------------------------------------------------------ timing
class StepTimes:
    """A Lightning callback: per training step its epoch, start, end (after the optimizer update) and batch size;
    with `cuda`, torch.cuda.synchronize() before each clock read and the peak allocated memory of the steps."""

    def __init__(self, cuda: bool):
        import pytorch_lightning as pl

        self.cuda = cuda
        self.steps: List[Tuple[int, float, float, int]] = []
        self.peak_bytes = 0
        self._start = 0.0
        timer = self

        class Hook(pl.Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                timer._start = timer.now()

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                   batch_idx: int) -> None:
                end = timer.now()
                timer.steps.append((trainer.current_epoch, timer._start, end, len(batch["labels"])))
                if timer.cuda:
                    import torch

                    timer.peak_bytes = max(timer.peak_bytes, torch.cuda.max_memory_allocated())

        self.callback = Hook()

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def images_per_s(self, warmup: int) -> Tuple[float, int]:
        """Images/s over the steps after `warmup`: a step's time runs from the end of the step before it in the same
        epoch (its batch loading included); the first step of an epoch counts from its own start (the DataLoader's
        start and the previous epoch's last.ckpt are not training). Returns (images/s, steps timed)."""
        timed = self.steps[warmup:]
        if not timed:
            raise RuntimeError(f"only {len(self.steps)} training steps ran, the warm-up is {warmup}")
        seconds = images = 0.0
        for i, (epoch, start, end, n) in enumerate(self.steps[warmup:], start=warmup):
            before = self.steps[i - 1] if i else None
            seconds += end - (before[2] if before is not None and before[0] == epoch else start)
            images += n
        return images / seconds, len(timed)


# ------------------------------------------------------------------------------------------------------ the jobs
def compose(config_name: str, overrides: List[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metriclab.core.paths import CONFIGS_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def scaled_schedule(epochs: int) -> Tuple[int, List[int]]:
    """The recipe's warm-up and lr-drop epochs scaled to a run of `epochs` epochs."""
    warmup = max(1, round(epochs * RECIPE_WARMUP / RECIPE_EPOCHS))
    first = max(warmup + 1, round(epochs * RECIPE_MILESTONES[0] / RECIPE_EPOCHS))
    return warmup, [first, max(first + 1, round(epochs * RECIPE_MILESTONES[1] / RECIPE_EPOCHS))]


@dataclass
class Plan:
    device: str
    extractor: str
    height: int
    width: int
    n_labels: int
    n_instances: int
    num_workers: int
    steps: int
    warmup: int
    epochs: int
    steps_per_epoch: int
    schedule: Tuple[int, List[int]]


def make_plan(args: argparse.Namespace) -> Plan:
    extractor, height, width, n_labels, n_instances, workers = DEVICE_DEFAULTS[args.device]
    extractor = args.extractor or extractor
    height, width = args.height or height, args.width or width
    n_labels, n_instances = args.n_labels or n_labels, args.n_instances or n_instances
    workers = workers if args.num_workers is None else args.num_workers
    train_ids = args.ids // 2
    if train_ids < max(2, n_labels):
        raise SystemExit(f"gpu-check: --ids {args.ids} gives {train_ids} train identities, fewer than the "
                         f"{n_labels} per batch (--n-labels): use --ids >= {2 * max(2, n_labels)}")
    if n_instances > 12:
        raise SystemExit(f"gpu-check: --n-instances {n_instances}: each train identity has 12 images")
    per_epoch = train_ids // n_labels  # BalanceSampler: every identity once per epoch
    epochs = math.ceil(args.steps / per_epoch)
    warmup = min(args.warmup, max(1, args.steps // 4))
    return Plan(args.device, extractor, height, width, n_labels, n_instances, workers, args.steps, warmup, epochs,
                per_epoch, scaled_schedule(epochs))


def train_overrides(args: argparse.Namespace, plan: Plan, out: Path, data: Path) -> List[str]:
    warmup, milestones = plan.schedule
    overrides = [
        f"dataset.root={data}", f"paths.outputs_dir={out}/outputs", f"paths.run_dir={out}/runs/train",
        "config_name=gpu_check",
        f"extractor={plan.extractor}", f"extractor.weights={args.weights}",
        "trainer=gpu" if plan.device == "cuda" else "trainer=cpu",
        "channels_last=true",
        f"transforms.train.height={plan.height}", f"transforms.train.width={plan.width}",
        f"sampler.n_labels={plan.n_labels}", f"sampler.n_instances={plan.n_instances}",
        f"+trainer.max_steps={plan.steps}", f"trainer.max_epochs={plan.epochs}",
        f"trainer.check_val_every_n_epoch={plan.epochs}",  # validated once, after training
        f"scheduler.warmup_epochs={warmup}", f"scheduler.milestones=[{milestones[0]},{milestones[1]}]",
        "trainer.enable_progress_bar=false", "validate_before_training=true",
        f"num_workers={plan.num_workers}", f"seed={args.seed}",
    ]
    if plan.device == "cpu":
        overrides.append("trainer.precision=32-true")
    if args.threads:
        overrides.append(f"num_threads={args.threads}")
    return overrides


def train_timed(cfg: Any, timer: StepTimes) -> Dict[str, Any]:
    """`train(cfg)` with the timing callback added to the trainer it builds."""
    import metriclab.jobs.train as train_mod

    build_loop = train_mod.build_loop

    def with_timer(*a: Any, **k: Any) -> Any:
        loop = build_loop(*a, **k)
        loop.trainer.callbacks.append(timer.callback)
        return loop

    train_mod.build_loop = with_timer
    try:
        return train_mod.train(cfg)
    finally:
        train_mod.build_loop = build_loop


def cuda_provider_parity(export_cfg: Any, result: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """onnxruntime's CUDA provider vs PyTorch fp32 (CPU) on the export's parity images; None when not installed."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    import torch

    from metriclab.core.config import build
    from metriclab.inference.export import ExportedExtractor, compare, parity_images
    from metriclab.inference.onnx_model import open_session
    from metriclab.jobs.export import export_config
    from metriclab.models.extractors import build_extractor_for_inference

    cfg = export_config(export_cfg)
    model, _, _ = build_extractor_for_inference(cfg.extractor, cfg.ckpt)
    images, _, _ = parity_images(cfg, build(cfg.transforms.val, "transforms.val"), int(cfg.parity.batch_size))
    session = open_session(result["model"], ["CUDAExecutionProvider"], torch.get_num_threads())
    return compare(session, ExportedExtractor(model.eval()).eval(), images)


# --------------------------------------------------------------------------------------------------- reporting
def versions() -> Dict[str, str]:
    import onnxruntime
    import pytorch_lightning as pl
    import torch

    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version()),
            "lightning": pl.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 1024**3:.0f} GiB)"
    return "CPU (no GPU)"


def metric(metrics: Optional[Dict[str, float]], key: str) -> str:
    value = (metrics or {}).get(key)
    return "n/a" if value is None else f"{value:.4f}"


def markdown(r: Dict[str, Any]) -> str:
    plan: Plan = r["plan"]
    v = r["versions"]
    parity = r["parity"]
    cuda_parity = r.get("cuda_parity")
    precision = "16-mixed" if plan.device == "cuda" else "32-true"
    init, after = r["init_metrics"], r["val_metrics"]
    lines = [
        f"### GPU check: {r['device_name']}, {r['date']}",
        "",
        f"Measured {r['date']} on {r['device_name']}; host CPU {cpu_model()}, {os.cpu_count()} cores; torch "
        f"{v['torch']} (CUDA {v['cuda']}, cuDNN {v['cudnn']}), Lightning {v['lightning']}, onnxruntime "
        f"{v['onnxruntime']}, Python {v['python']}. Command: `{r['command']}`.",
        "",
        f"Data: synthetic Market-1501 tree (128×64 person images, converters/market1501.py): {r['data']['train']:,} "
        f"train images of {r['data']['ids'] // 2} identities, {r['data']['query']:,} queries, "
        f"{r['data']['gallery']:,} gallery images before junk removal. Training: `{CONFIG}` ({plan.extractor}, "
        f"{'random init' if r['weights'] == 'null' else r['weights']}; BNNeck ID + batch-hard triplet), "
        f"`trainer={'gpu' if plan.device == 'cuda' else 'cpu'}` ({precision}), `channels_last=true`, "
        f"{plan.height}×{plan.width} inputs, {plan.n_labels}×{plan.n_instances} batches, {r['steps_done']} steps "
        f"({plan.epochs} epochs of {plan.steps_per_epoch}; lr warm-up {plan.schedule[0]} epoch(s), × 0.1 at epochs "
        f"{plan.schedule[1][0]} and {plan.schedule[1][1]}: the recipe's 10 / 40, 70 of 120 scaled), "
        f"{plan.num_workers} DataLoader workers.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| training images/s ({r['timed_steps']} steps after {plan.warmup} warm-up, data loading included) | "
        f"{r['images_per_s']:.1f} |",
        f"| training wall time (train job: set-up, both validations, checkpoints) | {r['train_s']:.1f} s |",
    ]
    if plan.device == "cuda":
        lines.append(f"| peak GPU memory, training steps (torch.cuda.max_memory_allocated) | "
                     f"{r['peak_bytes'] / 1024**3:.2f} GiB |")
    lines += [
        f"| validation mAP, untrained → trained | {metric(init, 'mAP')} → {metric(after, 'mAP')} |",
        f"| validation cmc@1, untrained → trained | {metric(init, 'cmc@1')} → {metric(after, 'cmc@1')} |",
        f"| validate wall time (validate job on best.ckpt, {r['val_images']:,} images) | {r['validate_s']:.1f} s |",
        f"| ONNX parity max abs diff (onnxruntime CPU vs PyTorch fp32, batch "
        f"{' and '.join(k.split('_')[1] for k in parity)}) | {max(p['max_abs_diff'] for p in parity.values()):.2e} |",
        f"| ONNX parity min cosine | {min(p['min_cosine'] for p in parity.values()):.7f} |",
    ]
    if cuda_parity is not None:
        lines.append(f"| ONNX parity, onnxruntime CUDA provider: max abs diff / min cosine | "
                     f"{cuda_parity['max_abs_diff']:.2e} / {cuda_parity['min_cosine']:.7f} |")
    else:
        lines.append("| ONNX parity, onnxruntime CUDA provider | not installed |")
    return "\n".join(lines) + "\n"


def mlflow_statuses(out: Path) -> List[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted(f"{r.data.tags.get('task', '?')} {r.info.status}" for r in runs)


# ------------------------------------------------------------------------------------------------------ main
@contextlib.contextmanager
def stage(name: str, log: Any, verbose: bool) -> Iterator[None]:
    """Runs a stage with the jobs' own output going to the log (unless verbose); any error becomes a StageError."""
    log.write(f"\n===== {name}\n")
    log.flush()
    try:
        if verbose:
            yield
        else:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
    except Exception as e:
        log.write(traceback.format_exc())
        raise StageError(name, e) from e


def run(args: argparse.Namespace, plan: Plan, out: Path, log: Any) -> Dict[str, Any]:
    import torch

    cuda = args.device == "cuda"
    r: Dict[str, Any] = {"plan": plan, "versions": versions(), "device_name": device_name(args.device),
                         "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "weights": args.weights,
                         "command": " ".join(["python bench/gpu_check.py", *sys.argv[1:]])}
    print(f"gpu-check: {r['device_name']}, torch {r['versions']['torch']} (CUDA {r['versions']['cuda']}); "
          f"out {out}", flush=True)
    data = out / "data" / "Market-1501-v15.09.15"
    t = time.perf_counter()
    with stage("data", log, args.verbose):
        r["data"] = write_market(data, args.ids, args.seed)
    print(f"data: {r['data']['train']:,} train, {r['data']['query']:,} query, {r['data']['gallery']:,} gallery images "
          f"of {args.ids} identities in {time.perf_counter() - t:.1f} s", flush=True)

    t = time.perf_counter()
    with stage("convert", log, args.verbose):
        from converters.market1501 import main as convert

        if convert([str(data)]) != 0:
            raise RuntimeError(f"converters/market1501.py {data} failed (its error is in the log)")
    print(f"convert: {data / 'dataset.csv'} in {time.perf_counter() - t:.1f} s", flush=True)

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the runs go to the store under --out, never a server
    timer = StepTimes(cuda)
    with stage("train", log, args.verbose):
        from metriclab.jobs.entry import prepare

        cfg = prepare("train", compose(CONFIG, train_overrides(args, plan, out, data)))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = timer.now()
        trained = train_timed(cfg, timer)
        r["train_s"] = timer.now() - t
        if not trained.get("best_ckpt"):
            raise RuntimeError(f"the training run {trained['run_dir']} left no best.ckpt")
        r["images_per_s"], r["timed_steps"] = timer.images_per_s(plan.warmup)
    r["steps_done"], r["peak_bytes"] = trained["global_step"], timer.peak_bytes
    r["init_metrics"] = trained["init_metrics"]
    peak = f", peak GPU memory {timer.peak_bytes / 1024**3:.2f} GiB" if cuda else ""
    print(f"train: {trained['global_step']} steps in {r['train_s']:.1f} s, {r['images_per_s']:.1f} images/s over "
          f"{r['timed_steps']} steps after {plan.warmup} warm-up{peak}; run dir {trained['run_dir']}", flush=True)

    with stage("validate", log, args.verbose):
        from metriclab.jobs.validate import validate

        vcfg = prepare("validate", compose("validate", [
            f"paths.outputs_dir={out}/outputs", f"paths.run_dir={out}/runs/validate", "config_name=gpu_check",
            f"run={trained['run_dir']}", f"ckpt={trained['best_ckpt']}", "evaluation.tsne=false",
            f"device={args.device}", f"num_workers={plan.num_workers}",
            *([f"num_threads={args.threads}"] if args.threads else [])]))
        t = timer.now()
        validated = validate(vcfg)
        r["validate_s"] = timer.now() - t
    r["val_metrics"] = validated["metrics"]
    r["val_images"] = len(validated["embeddings"])
    print(f"validate: {r['val_images']:,} images in {r['validate_s']:.1f} s: mAP {metric(r['init_metrics'], 'mAP')} "
          f"untrained -> {metric(r['val_metrics'], 'mAP')}, cmc@1 {metric(r['init_metrics'], 'cmc@1')} -> "
          f"{metric(r['val_metrics'], 'cmc@1')}", flush=True)

    with stage("export", log, args.verbose):
        from metriclab.jobs.export import export

        overrides = [f"paths.outputs_dir={out}/outputs", f"paths.run_dir={out}/runs/export", "config_name=gpu_check",
                     f"ckpt={trained['best_ckpt']}", f"export_dir={out}/export",
                     *([f"num_threads={args.threads}"] if args.threads else [])]
        t = time.perf_counter()
        exported = export(prepare("export", compose("export", overrides)))
        export_s = time.perf_counter() - t
        r["parity"] = {k: v for k, v in exported["parity"].items() if k.startswith("batch_")}
        r["cuda_parity"] = cuda_provider_parity(compose("export", overrides), exported)
    worst = (max(p["max_abs_diff"] for p in r["parity"].values()), min(p["min_cosine"] for p in r["parity"].values()))
    print(f"export: {exported['model']} in {export_s:.1f} s; parity (onnxruntime CPU vs PyTorch fp32): max abs diff "
          f"{worst[0]:.2e}, min cosine {worst[1]:.7f}", flush=True)
    with stage("mlflow", log, args.verbose):
        statuses = mlflow_statuses(out)
    print(f"MLflow ({out}/outputs/mlflow.db): {', '.join(statuses)}", flush=True)
    return r


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; without a CUDA GPU: one line, exit 0) or cpu (a smoke run, 32-true)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="steps left out of images/s (default 20, at most steps // 4)")
    parser.add_argument("--ids", type=int, default=400,
                        help="identities, half train half query/gallery (default 400: 200 train = 12 steps an epoch)")
    parser.add_argument("--height", type=int, help="input height (default 256 on cuda, 64 on cpu)")
    parser.add_argument("--width", type=int, help="input width (default 128 on cuda, 32 on cpu)")
    parser.add_argument("--n-labels", type=int, help="identities per batch (default 16 on cuda, 2 on cpu)")
    parser.add_argument("--n-instances", type=int, help="images per identity in a batch (default 4)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers (default min(8, cores) on cuda, 0 on cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (num_threads; default torch's)")
    parser.add_argument("--extractor", help="extractor config (configs/extractor/; default resnet50, the recipe's, on "
                        "cuda; resnet18 on cpu)")
    parser.add_argument("--weights", default="null",
                        help="extractor.weights: null = random init (default; nothing downloaded), or a zoo key")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    parser.add_argument("--out", type=Path, help="output folder, new or empty (default outputs/gpu_check/<timestamp>)")
    parser.add_argument("--verbose", action="store_true", help="show the jobs' own output instead of logging it")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.ids < 4:
        parser.error("--steps must be >= 2 and --ids >= 4")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU visible to torch (torch {torch.__version__}): nothing to check here")
        return 0
    plan = make_plan(args)  # a bad combination of options stops here, before anything is written
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or REPO / "outputs" / "gpu_check" / stamp).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"gpu-check: error: --out {out} exists and is not an empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not args.verbose:
        import logging
        import warnings

        import pytorch_lightning  # noqa: F401  (its import sets its loggers' levels: ours come after)

        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)  # their handlers print past the log redirection
        warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning.*")
    log_path = out / "gpu_check.log"
    with open(log_path, "w") as log:
        try:
            results = run(args, plan, out, log)
        except StageError as e:
            (out / "traceback.txt").write_text(traceback.format_exc())
            print(f"gpu-check: error: {e} (log: {log_path})", file=sys.stderr)
            return 1
    block = markdown(results)
    (out / "gpu_check.md").write_text(block)
    print(f"\n{block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
