"""Learning-rate schedules torch does not ship as one class: linear warm-up followed by another schedule."""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, SequentialLR


def warmup_cosine(optimizer: Optimizer, warmup_epochs: int, max_epochs: int, start_factor: float = 0.1,
                  eta_min: float = 0.0) -> SequentialLR:
    """Linear warm-up from `start_factor` x lr to lr over `warmup_epochs`, then cosine decay to `eta_min`."""
    if not 0 <= warmup_epochs < max_epochs:
        raise ValueError(f"scheduler.warmup_epochs={warmup_epochs} must be >= 0 and < max_epochs={max_epochs}")
    warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=max(warmup_epochs, 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max_epochs - warmup_epochs, eta_min=eta_min)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def warmup_multistep(optimizer: Optimizer, warmup_epochs: int, milestones: list, gamma: float = 0.1,
                     start_factor: float = 0.1) -> SequentialLR:
    """The re-ID bag-of-tricks schedule: linear warm-up, then lr x gamma at each milestone epoch."""
    warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=max(warmup_epochs, 1))
    steps = MultiStepLR(optimizer, milestones=[m - warmup_epochs for m in milestones], gamma=gamma)
    return SequentialLR(optimizer, [warmup, steps], milestones=[warmup_epochs])
