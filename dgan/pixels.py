"""Pixel conversions shared by generation, the tasks and the metrics (no torch-fidelity needed)."""
from __future__ import annotations

import torch
from torch import Tensor

from dgan.errors import MetricError


def to_uint8(x: Tensor) -> Tensor:
    """Map images in [-1, 1] to uint8 [0, 255]: scale, round to nearest, clamp out-of-range values."""
    if not torch.isfinite(x).all():
        # A NaN cast to uint8 is undefined; a diverged generator must be reported, not scored.
        raise MetricError("images contain NaN or inf; cannot convert to uint8")
    return ((x.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def edge_energy(images_u8: Tensor) -> float:
    """Mean |difference| of horizontally and vertically neighbouring pixels, in grey levels: how much fine
    detail (or grain) a set of uint8 images carries. Hand-rolled: no library gives this one-line statistic."""
    x = images_u8.float()
    return float(((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()) / 2)
