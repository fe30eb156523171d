"""The optimizer update of one training step: unscale and clip the gradients, then step or skip,
decided on device (no host sync). Split from dgan/step.py, which builds the gradients."""
from __future__ import annotations

import torch


def unscale_and_clip(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     params: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale (fp16) and clip in place. Returns (grad_norm, found_inf 0/1) as device tensors.

    DDP has already averaged the gradients, so a NaN on one rank is a NaN on every rank: all
    ranks reach the same verdict without an extra collective.
    """
    if scaler.is_enabled():
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    limit = max_norm if max_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
    return grad_norm.detach(), (~torch.isfinite(grad_norm)).float()


def apply_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, found_inf: torch.Tensor) -> None:
    """Step unless found_inf=1, decided on device (no host sync).

    The fused Adam kernel skips the whole update, step count included, when its `found_inf`
    is 1; that is how GradScaler skips overflowed fp16 steps, and we use the same mechanism
    for fp32/bf16. Under fp16 each GradScaler keeps its own verdict (its standard dynamic
    loss scaling), so there G and D skip independently.
    """
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
        return
    opt.found_inf, opt.grad_scale = found_inf, None
    opt.step()
    del opt.found_inf, opt.grad_scale
