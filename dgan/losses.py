"""Pure loss functions for the hybrid step: diffusion MSE, logistic GAN losses, R1.

No state and no host-device syncs: a per-sample mask is applied with tensor
arithmetic (sum / clamp_min(count, 1)), never by branching on its value.
Logits may be a patch map ``[B, 1, h, w]`` or anything with the batch first.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def diffusion_loss(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean squared error between G's output and its target (eps or v), averaged over all
    elements; with ``weight`` [B], each sample's mean is weighted first (min-SNR)."""
    if pred.shape != target.shape:
        # mse_loss would broadcast mismatched shapes with only a warning.
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if weight is None:
        return F.mse_loss(pred, target)
    per_sample = (pred - target).pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    return (weight * per_sample).mean()


def _masked_mean(loss_fn: Callable[[Tensor], Tensor], logits: Tensor, weight: Optional[Tensor]) -> Tensor:
    """``loss_fn(logits)`` averaged over all elements, or over samples whose 0/1 ``weight`` is 1.

    Each sample is first averaged over its own patches, so a kept sample counts
    once whatever the patch-map size. With no sample kept the result is an exact
    0 that still carries a graph, so ``backward`` works without a host check.
    """
    if weight is None:
        return loss_fn(logits).mean()
    batch = logits.shape[0]
    if weight.shape != (batch,):
        raise ValueError(f"weight must have shape [{batch}], got {tuple(weight.shape)}")
    w = weight.to(logits.dtype)
    keep = (w > 0).view(-1, *([1] * (logits.dim() - 1)))
    # Dropped logits are replaced *before* the loss, so a non-finite logit on a dropped
    # sample yields neither a NaN loss nor a NaN gradient (0 * NaN would be NaN).
    safe = torch.where(keep, logits, torch.zeros_like(logits))
    per_sample = loss_fn(safe).reshape(batch, -1).mean(dim=1)
    return (w * per_sample).sum() / w.sum().clamp_min(1.0)


def d_loss(real_logits: Tensor, fake_logits: Tensor, *, fake_weight: Optional[Tensor] = None) -> Tensor:
    """Non-saturating logistic D loss: ``mean softplus(-real) + mean softplus(fake)``.

    ``fake_weight`` is an optional 0/1 mask ``[B]`` over fakes; the fake term then averages
    over kept fakes only and is 0 when none is kept, as it is for an empty ``fake_logits``
    (the hybrid step passes only the fakes whose diffusion t <= adv_t_max).
    """
    real_term = F.softplus(-real_logits).mean()
    if fake_logits.shape[0] == 0:  # a batch that yielded no fake (a shape: no device sync)
        return real_term
    return real_term + _masked_mean(F.softplus, fake_logits, fake_weight)


def g_adv_loss(fake_logits: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Non-saturating G loss ``mean softplus(-fake)``, optionally over a 0/1 mask ``[B]``.

    With the mask all zero the loss is 0 but still differentiable (zero gradient),
    so the caller can add it to L_diff unconditionally.
    """
    return _masked_mean(lambda z: F.softplus(-z), fake_logits, weight)


def r1_penalty(real_logits: Tensor, real_inputs: Tensor) -> Tensor:
    """R1 gradient penalty ``mean_over_batch ||d sum(D(x)) / dx||^2`` on real inputs.

    Convention: no factor 1/2, and the gradient is of the *sum* of a sample's
    patch logits. The caller multiplies by ``gamma * r1_every`` (lazy R1), so our
    gamma equals StyleGAN2's gamma / 2. ``real_inputs`` must have had
    ``requires_grad_(True)`` before D's forward. The graph is kept
    (``create_graph=True``) so the penalty can be backpropagated into D.
    """
    if not real_inputs.requires_grad:
        raise ValueError("r1_penalty needs real_inputs.requires_grad_(True) set before D's forward")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(dim=1).mean()
