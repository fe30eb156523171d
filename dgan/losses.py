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


def balanced_adv_surrogate(out: Tensor, L_diff: Tensor, L_adv: Tensor, fakes: slice, ratio: float,
                           *, own_reference: bool = True) -> Tensor:
    """A term whose gradient w.r.t. G's output is, on each fake (the rows ``fakes`` of ``out``),
    D's gradient rescaled to ``ratio`` times a diffusion-loss gradient norm: that fake's own
    (``own_reference``, a fake made from a diffusion sample of the batch), or else the mean over
    the rows that have one (a fake from G's own sampler has no diffusion target).

    Why (gan.adv_balance): with a fixed weight, a D that learns pushed G's output towards texture
    with as much force as it liked and ruined the samples; a D held at chance made the term noise
    (benchmarks/RESULTS.md, "The defect behind the coin flip"). Bounded per fake, the adversarial
    push can tilt G's prediction by at most a fraction of what the diffusion loss pulls, whatever
    D's logits do, so D may be allowed to learn. (VQGAN balances the two at G's last layer; at
    G's output the balance is per sample, needs no access to G's layers and costs no G backward.)

    Both gradients are taken w.r.t. ``out`` only (a non-leaf: no parameter gradient, no DDP
    reducer involved); ``L_adv``'s graph is freed, ``L_diff``'s is kept for the caller's backward.
    The result does not depend on ``L_adv``'s scale, so the caller passes it through its fp16
    GradScaler: D's backward in half precision then neither underflows nor, on an overflow, hides
    from the scaler (the inf becomes a NaN gradient, the step is skipped and the scale backs off).
    """
    k = len(range(*fakes.indices(out.shape[0])))
    if k == 0 or ratio == 0:  # no fake, or the warm-up's zero gain (host numbers: no sync)
        return out.new_zeros(())
    (g_diff,) = torch.autograd.grad(L_diff, out, retain_graph=True)
    (g_adv,) = torch.autograd.grad(L_adv, out)
    norm_diff = g_diff.reshape(out.shape[0], -1).norm(dim=1)
    if own_reference:
        reference = norm_diff[fakes]
    else:  # the rows with a diffusion target; counted on device, no boolean indexing (a host sync)
        has_target = (norm_diff > 0).to(norm_diff.dtype)
        reference = (norm_diff.sum() / has_target.sum().clamp_min(1.0)).expand(k)
    g_adv = g_adv[fakes]
    norm_adv = g_adv.reshape(k, -1).norm(dim=1).clamp_min(1e-30)
    scale = (ratio * reference / norm_adv).view(k, *([1] * (out.dim() - 1)))
    return (out[fakes] * (scale * g_adv).detach()).sum()


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
