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
