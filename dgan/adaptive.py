"""Diffusion-GAN instance noise and the adaptive-T controller (arXiv 2206.02262).

The discriminator never sees clean images: reals and fakes are both pushed through
a forward diffusion ``y = sqrt(abar_tau) x + sqrt(1 - abar_tau) sigma eps`` at a
random depth ``tau``. How deep ``tau`` may go (``T_adapt``) is steered by a
controller that watches how confidently D calls reals real.

Everything that runs inside a training step (``sample_tau``, ``diffuse``,
``AdaptiveT.accumulate`` and ``AdaptiveT.update``) works on device tensors only.
It never calls ``.item()``, never converts a tensor to a python number and never
branches on a tensor's value, so the step stays free of host-device syncs. Python
numbers appear only in ``AdaptiveT.state_dict`` and ``AdaptiveT.as_metrics``,
which the trainer calls at checkpoint and log time.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor

TauDist = Literal["priority", "uniform"]
Device = Union[str, torch.device]
# Sums a 1-D tensor over ranks, e.g. ``lambda t: (dist.all_reduce(t), t)[1]``.
ReduceFn = Callable[[Tensor], Tensor]


def check_alpha_bar_covers(alpha_bar: Tensor, t_max: int) -> None:
    """Fail at build time if ``diffuse`` could index past the end of ``alpha_bar``.

    ``sample_tau`` can return any tau in ``{0..t_max}``, so ``alpha_bar`` needs
    ``t_max + 1`` entries. Inside the step an out-of-range index is an IndexError
    on CPU but an opaque device-side assert on CUDA, hence this check up front.
    """
    if alpha_bar.dim() != 1 or alpha_bar.shape[0] < t_max + 1:
        raise ValueError(
            f"alpha_bar has shape {tuple(alpha_bar.shape)} but tau can reach t_max={t_max}: "
            f"build the instance-noise schedule with at least t_max + 1 = {t_max + 1} steps, "
            f"or lower t_max to {alpha_bar.shape[0] - 1}"
        )


def _tau_weights(t_adapt: Tensor, t_max: int, dist: TauDist, device: Device) -> Tensor:
    """Unnormalised P(tau = k) for k in {0..t_max}, zero above ``t_adapt``."""
    k = torch.arange(t_max + 1, device=device)
    allowed = k <= t_adapt
    # float64 keeps the cumulative sum exact (integer-valued) for any realistic t_max.
    if dist == "priority":
        # P(k) proportional to k: deeper noise is drawn more often, and k=0 has weight 0.
        return torch.where(allowed, k, 0).to(torch.float64)
    if dist == "uniform":
        return allowed.to(torch.float64)
    raise ValueError(f"tau dist must be 'priority' or 'uniform', got {dist!r}")


def sample_tau(
    batch_size: int,
    t_adapt: Union[Tensor, int],
    *,
    t_max: int,
    dist: TauDist = "priority",
    zero_fraction: float = 0.5,
    generator: Optional[torch.Generator] = None,
    device: Optional[Device] = None,
) -> Tensor:
    """Draw one diffusion depth tau per sample for D's instance noise.

    tau follows ``dist`` over ``{1..T_adapt}`` ('priority', P(k) ∝ k) or
    ``{0..T_adapt}`` ('uniform'); then each sample is independently reset to
    tau=0 with probability ``zero_fraction``. So with 'uniform' the share of
    zeros is slightly above ``zero_fraction``. With ``T_adapt == 0`` every tau is 0.

    ``t_adapt`` may be a 0-dim device tensor (the controller's state) and is never
    read on the host: sampling is an inverse CDF (``searchsorted``) over all
    ``t_max + 1`` depths with the weights above ``t_adapt`` masked to zero.
    ``generator`` must live on ``device`` (default: ``t_adapt``'s device).
    Returns a long tensor of shape ``[batch_size]``.
    """
    if not 0.0 <= zero_fraction <= 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1], got {zero_fraction}")
    if device is None:
        device = t_adapt.device if isinstance(t_adapt, Tensor) else "cpu"
    t_adapt = torch.as_tensor(t_adapt, device=device)
    cdf = torch.cumsum(_tau_weights(t_adapt, t_max, dist, device), dim=0)
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    # right=True: the first k with cdf[k] > u*total, so zero-weight depths are never hit.
    tau = torch.searchsorted(cdf, u * cdf[-1], right=True)
    # Two cases land past the last allowed depth: u*total rounding up to total, and
    # priority with T_adapt=0 (all weights zero). Clamping maps both into range.
    tau = torch.minimum(tau, t_adapt)
    keep_clean = torch.rand(batch_size, generator=generator, device=device) < zero_fraction
    return torch.where(keep_clean, torch.zeros_like(tau), tau)


def diffuse(
    x: Tensor,
    tau: Tensor,
    alpha_bar: Tensor,
    sigma: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Diffusion-GAN instance noise: ``sqrt(abar_tau) x + sqrt(1 - abar_tau) sigma eps``.

    ``alpha_bar[k]`` is indexed directly by tau, so tau=0 uses ``alpha_bar[0] =
    1 - beta_0 < 1``: it is *nearly* clean (noise std ``sqrt(beta_0) * sigma``, about
    5e-4 for the defaults), not the identity. We keep that on purpose: every tau,
    including 0, goes through the same formula, so reals and fakes at tau=0 get
    the same tiny blur and the tau embedding in D sees one consistent schedule.
    ``alpha_bar`` must have at least ``max(tau) + 1`` entries (see
    ``check_alpha_bar_covers``) and live on ``tau``'s device.

    Differentiable w.r.t. ``x`` (dy/dx = sqrt(abar_tau)), so G's adversarial
    gradient flows through the noise. ``x`` is ``[B, ...]``, ``tau`` is ``[B]``.
    """
    if tau.dim() != 1 or tau.shape[0] != x.shape[0]:
        raise ValueError(f"tau must have shape [{x.shape[0]}], got {tuple(tau.shape)}")
    abar = alpha_bar[tau].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return abar.sqrt() * x + (1.0 - abar).sqrt() * sigma * eps


class AdaptiveT:
    """Adaptive-T controller: moves ``p`` (and so ``T_adapt``) to hold r_d at ``target``.

    State, all device tensors so the step never syncs:

    - ``p``: float64 0-dim in [0, 1], starts at 0. float64 so that a checkpoint
      round trip through a python float is exact.
    - ``t_adapt``: long 0-dim, always ``t_min + round(p * (t_max - t_min))``.
    - ``r_d``: float 0-dim, the r_d used by the last ``update`` (0 before any).
    - accumulators since the last update, int64 so counts stay exact at any scale:
      sum of ``sign(D(real))`` over every patch logit, number of patch logits, and
      ``imgs_since_last`` (images of *this rank*; ``update`` sums them over ranks).

    Per step call ``accumulate``; when ``should_update(step)`` is true call
    ``update(reduce_fn)`` on every rank.
    """

    def __init__(
        self,
        target: float = 0.6,
        interval: int = 4,
        ada_kimg: float = 100.0,
        t_min: int = 10,
        t_max: int = 1000,
        device: Device = "cpu",
    ) -> None:
        if not 0 <= t_min <= t_max:
            raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        if interval < 1 or ada_kimg <= 0:
            raise ValueError(f"need interval >= 1 and ada_kimg > 0, got {interval}, {ada_kimg}")
        if not -1.0 <= target <= 1.0:
            raise ValueError(f"target is a mean of signs, so must be in [-1, 1], got {target}")
        self.target = target
        self.interval = interval
        self.ada_kimg = ada_kimg
        self.t_min = t_min
        self.t_max = t_max
        self.p = torch.zeros((), dtype=torch.float64, device=device)
        self.t_adapt = torch.full((), t_min, dtype=torch.long, device=device)
        self.r_d = torch.zeros((), dtype=torch.float32, device=device)
        # [sign sum, logit count, images]: one tensor so DDP needs a single all-reduce.
        self._acc = torch.zeros(3, dtype=torch.long, device=device)

    @property
    def imgs_since_last(self) -> Tensor:
        """Images this rank has accumulated since the last update (0-dim long tensor)."""
        return self._acc[2]

    def accumulate(self, real_logits: Tensor, batch_size: Optional[int] = None) -> None:
        """Add one batch of D's logits on (diffused) reals; every patch logit counts.

        ``batch_size`` defaults to ``real_logits.shape[0]``; pass it when the
        logits cover a different number of images than the batch.
        """
        n_imgs = real_logits.shape[0] if batch_size is None else batch_size
        signs = torch.sign(real_logits.detach()).to(torch.long).sum()
        self._acc[0] += signs
        self._acc[1] += real_logits.numel()
        self._acc[2] += n_imgs

    def should_update(self, step: int) -> bool:
        """True after every ``interval`` steps; ``step`` is the 0-based index of the step just done."""
        return (step + 1) % self.interval == 0

    def update(self, reduce_fn: Optional[ReduceFn] = None) -> None:
        """Move p by ``sign(r_d - target) * imgs / (ada_kimg * 1000)`` and reset.

        ``reduce_fn`` (an all-reduce SUM under DDP) gets the int64 tensor
        ``[sign_sum, count, imgs]`` of this rank and must return the sum over
        ranks. So r_d is the mean over all reals of all ranks, ``imgs`` is the
        global image count, and p ends up bitwise identical on every rank.
        With no images accumulated p is left unchanged.
        """
        acc = self._acc.clone()
        if reduce_fn is not None:
            acc = reduce_fn(acc)
        sign_sum, count, imgs = acc.unbind(0)
        # copy_ rather than rebinding, so references to p/t_adapt/r_d held elsewhere stay live.
        # A window in which D never ran (gan.self_fake_every) keeps the last r_d (and p: imgs is 0)
        r_d = sign_sum.to(torch.float32) / count.clamp_min(1).to(torch.float32)
        self.r_d.copy_(torch.where(count > 0, r_d, self.r_d))
        direction = torch.sign(self.r_d.to(torch.float64) - self.target)
        step_p = direction * imgs.to(torch.float64) / (self.ada_kimg * 1000.0)
        self.p.copy_((self.p + step_p).clamp(0.0, 1.0))
        self._refresh_t_adapt()
        self._acc.zero_()

    def _refresh_t_adapt(self) -> None:
        t = self.t_min + torch.round(self.p * (self.t_max - self.t_min))
        self.t_adapt.copy_(t.to(torch.long))

    def to(self, device: Device) -> "AdaptiveT":
        """Move every state tensor to ``device``; returns self."""
        self.p = self.p.to(device)
        self.t_adapt = self.t_adapt.to(device)
        self.r_d = self.r_d.to(device)
        self._acc = self._acc.to(device)
        return self

    def as_metrics(self) -> dict[str, float]:
        """Python numbers for logging. Syncs with the device: call at log time only."""
        return {
            "ada/p": float(self.p),
            "ada/t_adapt": float(self.t_adapt),
            "ada/r_d": float(self.r_d),
        }

    def window_state(self) -> list[int]:
        """This rank's partial r_d window since the last update. Rank-local, so the trainer
        saves it per rank (beside the RNG states) for an exact resume. Syncs."""
        return [int(v) for v in self._acc.tolist()]

    def load_window_state(self, window: list[int]) -> None:
        self._acc.copy_(torch.tensor(window, dtype=torch.long))

    def state_dict(self) -> dict[str, Union[float, int]]:
        """Plain python numbers (safe for ``torch.load(weights_only=True)``). Syncs.

        Only rank-identical state is saved. The partial window since the last
        update is rank-local, so it is not in here: the trainer saves it per rank via
        ``window_state`` (a resume with another world size starts a fresh window).
        ``t_adapt`` is saved for readers of the checkpoint; loading recomputes it.
        """
        return {"p": float(self.p), "t_adapt": int(self.t_adapt), "r_d": float(self.r_d)}

    def load_state_dict(self, state: dict[str, Union[float, int]]) -> None:
        """Restore from ``state_dict`` output; ``t_adapt`` follows from p and this t_min/t_max."""
        missing = [k for k in ("p", "r_d") if k not in state]
        if missing:
            raise KeyError(
                f"adaptive-T state is missing {missing}; expected the output of "
                f"AdaptiveT.state_dict() with keys ['p', 't_adapt', 'r_d'], got {sorted(state)}"
            )
        p = float(state["p"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"adaptive-T state has p={p}, outside [0, 1]")
        self.p.fill_(p)
        self.r_d.fill_(float(state["r_d"]))
        self._refresh_t_adapt()
        self._acc.zero_()
