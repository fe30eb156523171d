"""The learning-rate schedule of G and D: linear warm-up, then constant or a cosine decay."""
from __future__ import annotations

import math

import torch

from dgan.config import Config


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str, min_ratio: float) -> float:
    """Linear warm-up, then constant or a cosine decay to min_ratio at total_steps.

    Why decay: at a constant lr the weights keep jittering at the lr's noise floor, and a short
    EMA cannot average that away; the decay is what turns the last part of a run into refinement.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_schedule(opt: torch.optim.Optimizer, cfg: Config, global_batch: int):
    t = cfg.train
    warmup_steps = max(1, round(t.warmup_kimg * 1000 / global_batch))
    horizon_kimg = t.total_kimg if t.lr_decay_kimg is None else t.lr_decay_kimg
    total_steps = max(1, round(horizon_kimg * 1000 / global_batch))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup_steps, total_steps, t.lr_schedule, t.lr_min_ratio))
