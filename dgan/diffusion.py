"""Gaussian diffusion: the forward process, x0/eps conversions and samplers (schedules and timestep
grids: dgan/schedules.py).

Notation follows Ho et al. 2020: ``alpha_t = 1 - beta_t``, ``alpha_bar_t = prod_{s<=t} alpha_s``
and ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``. Timesteps are 0-based,
``t in {0..T-1}``; "clean" (alpha_bar = 1) is the implicit state after t = 0.

Samplers take a ``model_fn(x_t, t) -> output`` (eps_hat or v_hat, as ``prediction`` says) and know
nothing about the network, so callers can wrap it (classifier-free guidance, inpainting, EMA weights) without touching this file.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from dgan.schedules import SPACINGS, make_betas, timestep_grid

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(i, x, x0_hat): i is the 0-based step index, x the state *after* step i (after any
# step_hook), x0_hat the (possibly clipped) data prediction used for that step.
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
# step_hook(x, t_next) -> x: applied to the state after every update. t_next is the timestep
# the new state lives at (LongTensor [B]) or None once the state is the final clean sample.
StepHook = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
PREDICTIONS = ("eps", "v")


def _randn(shape: Sequence[int], generator: Optional[torch.Generator],
           device: torch.device) -> torch.Tensor:
    """Standard normal noise on `device`, drawn from `generator` for reproducibility.

    A generator can only fill tensors on its own device, so draw there and move.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
    return noise.to(device)


class Diffusion:
    """A discrete-time DDPM forward process plus DDPM, DDIM and DPM-Solver++(2M) samplers.

    Tables are computed in float64 and stored as float32 tensors on `device`. The samplers use
    float64 Python scalars for their per-step coefficients, since every sample in a batch shares
    the timestep and the cancellations near t = T-1 are where float32 hurts.
    """

    _TENSORS = ("betas", "alphas", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar",
                "sqrt_one_minus_alpha_bar", "posterior_variance", "posterior_log_variance",
                "posterior_mean_coef_x0", "posterior_mean_coef_xt")

    @classmethod
    def from_config(cls, dc, device: torch.device | str = "cpu") -> "Diffusion":
        """The process a DiffusionConfig (cfg.diffusion) describes: the one place that maps it."""
        return cls(dc.num_steps, dc.schedule, dc.beta_start, dc.beta_end, device=device,
                   prediction=dc.prediction, spacing=dc.timestep_spacing, t_min=dc.sample_t_min)

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, device: torch.device | str = "cpu", prediction: str = "eps",
                 spacing: str = "uniform", t_min: int = 0) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        if not 0 <= t_min < num_steps:
            raise ValueError(f"t_min must be in 0..{num_steps - 1} (the samplers' lowest timestep), got {t_min}")
        self.spacing = spacing
        self.t_min = int(t_min)  # the samplers' lowest timestep (timestep_grid)
        self.num_steps = int(num_steps)
        self.schedule = schedule
        # What the network outputs (see model_x0): "eps" (Ho et al.) or "v" (Salimans & Ho 2022)
        self.prediction = prediction
        self.device = torch.device(device)
        betas = make_betas(schedule, self.num_steps, beta_start, beta_end)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7); at t=0 the "previous" state is clean data
        post_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # variance is exactly 0 at t=0; reuse t=1's value so the log stays finite
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if num_steps > 1 \
            else torch.log(betas)
        self._alpha_bar64 = alpha_bar  # float64 CPU copy for the samplers' scalar coefficients
        tables = {
            "betas": betas, "alphas": alphas, "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev, "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "posterior_variance": post_var, "posterior_log_variance": post_log_var,
            "posterior_mean_coef_x0": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_mean_coef_xt": (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
        }
        for name, value in tables.items():
            setattr(self, name, value.to(device=self.device, dtype=torch.float32))

    def to(self, device: torch.device | str) -> "Diffusion":
        """Move every table to `device` in place and return self."""
        self.device = torch.device(device)
        for name in self._TENSORS:
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def __repr__(self) -> str:
        return (f"Diffusion(num_steps={self.num_steps}, schedule={self.schedule!r}, "
                f"prediction={self.prediction!r}, device={self.device})")

    # ----------------------------------------------------------------- forward process

    @staticmethod
    def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped [B, 1, 1, ...] so it broadcasts over every non-batch dim of `like`."""
        t = t.to(table.device).long()
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        values = table[t].to(like.device)
        return values.view(values.shape[0], *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) with the given noise: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return (self._gather(self.sqrt_alpha_bar, t, x0) * x0
                + self._gather(self.sqrt_one_minus_alpha_bar, t, x0) * eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample for x0 given the noise."""
        return ((x_t - self._gather(self.sqrt_one_minus_alpha_bar, t, x_t) * eps)
                / self._gather(self.sqrt_alpha_bar, t, x_t))

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert q_sample for the noise given x0."""
        return ((x_t - self._gather(self.sqrt_alpha_bar, t, x_t) * x0)
                / self._gather(self.sqrt_one_minus_alpha_bar, t, x_t))

    # ----------------------------------------------------------------- the network's output
    # v = sqrt(abar) eps - sqrt(1 - abar) x0. Why v and not eps: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
    # multiplies an eps error by up to 157x near t = T-1 (a linear T=1000 schedule), so a G that is
    # slightly wrong in fine detail there predicts a +/-1 speckle x0, and DDIM (eta = 0) adds that
    # speckle step after step (the "noise blob" samples). With v, x0 = sqrt(abar) x_t - sqrt(1-abar) v
    # and eps = sqrt(1-abar) x_t + sqrt(abar) v: no division anywhere, and near t = 0 x_t itself
    # carries the image (a full-resolution skip path that the UNet++ decoder lacks). The v loss is
    # the eps loss / abar, so training sees the high-t errors that the eps loss barely weighs.

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for (x0, t, eps)."""
        if self.prediction == "eps":
            return eps
        return (self._gather(self.sqrt_alpha_bar, t, x0) * eps
                - self._gather(self.sqrt_one_minus_alpha_bar, t, x0) * x0)

    def loss_weight(self, t: torch.Tensor, min_snr_gamma: float) -> Optional[torch.Tensor]:
        """Per-sample weights [B] of min-SNR-gamma (Hang et al. 2023), or None for a plain mean.

        They make the loss an x0 loss weighted by min(SNR, gamma): low-noise steps, whose x0 is
        nearly given, stop dominating the gradient. Divided by what the target already weighs
        x0 errors with (SNR for eps, SNR + 1 for v)."""
        if min_snr_gamma <= 0:
            return None
        abar = self.alpha_bar[t.to(self.alpha_bar.device).long()]
        snr = abar / (1.0 - abar)
        implied = snr if self.prediction == "eps" else snr + 1.0
        return (snr.clamp(max=min_snr_gamma) / implied).to(t.device)

    def model_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The data prediction x0_hat implied by the network output `out` at (x_t, t)."""
        if self.prediction == "eps":
            return self.predict_x0(x_t, t, out)
        return (self._gather(self.sqrt_alpha_bar, t, x_t) * x_t
                - self._gather(self.sqrt_one_minus_alpha_bar, t, x_t) * out)

    def _x0_eps_scalar(self, x: torch.Tensor, out: torch.Tensor, abar: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the network output at one shared timestep, with float64 scalar coefficients."""
        a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
        if self.prediction == "eps":
            return (x - s * out) / a, out
        return a * x - s * out, s * x + a * out

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and (clipped) log-variance of q(x_{t-1} | x_t, x0), each broadcastable."""
        mean = (self._gather(self.posterior_mean_coef_x0, t, x_t) * x0
                + self._gather(self.posterior_mean_coef_xt, t, x_t) * x_t)
        return (mean, self._gather(self.posterior_variance, t, x_t),
                self._gather(self.posterior_log_variance, t, x_t))

    # ----------------------------------------------------------------- sampler helpers

    def timesteps_for(self, steps: int) -> torch.LongTensor:
        """`steps` distinct timesteps from T-1 down to at least self.t_min (CPU LongTensor), spaced by
        self.spacing."""
        return timestep_grid(self.num_steps, steps, self.spacing, self.t_min)

    def abar_at(self, t: Optional[int]) -> float:
        """alpha_bar at timestep t as a float64 scalar; None means clean data (alpha_bar = 1)."""
        return 1.0 if t is None else float(self._alpha_bar64[t])

    def _initial_noise(self, shape: Optional[Sequence[int]], x_T: Optional[torch.Tensor],
                       generator: Optional[torch.Generator],
                       device: Optional[torch.device | str]) -> torch.Tensor:
        if x_T is not None:
            return x_T.to(device) if device is not None else x_T
        if shape is None:
            raise ValueError("give either shape or x_T")
        return _randn(shape, generator, torch.device(device) if device is not None else self.device)

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, t: int, clip_x0: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model at timestep t; return (x0_hat, eps_hat), consistent with each other.

        `model_fn` returns the network's raw output, interpreted by self.prediction."""
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        abar = self.abar_at(t)
        x0, eps = self._x0_eps_scalar(x, model_fn(x, t_batch), abar)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            # re-derive eps so the DDIM update stays on the line through x_t and the clipped x0
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
        return x0, eps

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t: int, t_next: Optional[int], *,
                  eta: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One DDIM update (Song et al. 2021, eq. 12) from timestep t to t_next (None: clean data),
        given the model's (x0, eps) at t (from `denoise`); eta scales the fresh noise. Public so
        that samplers built around it (RePaint in dgan.inpaint) make exactly this update."""
        abar, abar_next = self.abar_at(t), self.abar_at(t_next)
        sigma = eta * math.sqrt((1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next))
        # max(): rounding can push the remainder a hair below zero when eta = 1
        dir_coef = math.sqrt(max(1.0 - abar_next - sigma ** 2, 0.0))
        x = math.sqrt(abar_next) * x0 + dir_coef * eps
        if sigma > 0.0:
            x = x + sigma * _randn(x.shape, generator, x.device)
        return x

    @staticmethod
    def _t_tensor(t: Optional[int], x: torch.Tensor) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)

    # ----------------------------------------------------------------- samplers

    @torch.no_grad()
    def ddpm_sample(self, model_fn: ModelFn, shape: Optional[Sequence[int]] = None, *,
                    x_T: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device | str] = None, clip_x0: bool = True,
                    callback: Optional[Callback] = None,
                    step_hook: Optional[StepHook] = None) -> torch.Tensor:
        """Ancestral sampling over all T steps (t = T-1 .. 0) with the posterior variance.

        No noise is added at t = 0, so the result is the posterior mean there, which equals
        x0_hat. `step_hook(x, t_next)` is applied after each update (e.g. RePaint pasting of
        the known region, noised to t_next; t_next is None after the last step).
        """
        x = self._initial_noise(shape, x_T, generator, device)
        for i, t in enumerate(range(self.num_steps - 1, -1, -1)):
            x0, _ = self.denoise(model_fn, x, t, clip_x0)
            abar, abar_prev = self.abar_at(t), self.abar_at(t - 1 if t > 0 else None)
            beta = 1.0 - abar / abar_prev
            coef_x0 = beta * math.sqrt(abar_prev) / (1.0 - abar)
            coef_xt = (1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar)
            x_new = coef_x0 * x0 + coef_xt * x
            if t > 0:
                std = math.sqrt(beta * (1.0 - abar_prev) / (1.0 - abar))
                x_new = x_new + std * _randn(x.shape, generator, x.device)
            x = x_new
            t_next = t - 1 if t > 0 else None
            if step_hook is not None:
                x = step_hook(x, self._t_tensor(t_next, x))
            if callback is not None:
                callback(i, x, x0)
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, shape: Optional[Sequence[int]] = None, *,
                    steps: int = 50, eta: float = 0.0, x_T: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device | str] = None, clip_x0: bool = True,
                    callback: Optional[Callback] = None,
                    step_hook: Optional[StepHook] = None, end_t: Optional[int] = None) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12) over `steps` timesteps from timesteps_for(steps).

        eta = 0 is the deterministic probability-flow-like sampler; eta = 1 with steps = T has
        the same transition kernel as DDPM. The last step lands on clean data with no noise, or,
        with `end_t`, on x at timestep end_t (grid points at or below it skipped: the chain that
        makes the hybrid step's self-sampled fakes). `step_hook(x, t_next)` is applied after each
        update, as in ddpm_sample.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        x = self._initial_noise(shape, x_T, generator, device)
        ts = [t for t in self.timesteps_for(steps).tolist() if end_t is None or t > end_t]
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else end_t
            x0, eps = self.denoise(model_fn, x, t, clip_x0)
            x = self.ddim_step(x0, eps, t, t_next, eta=eta, generator=generator)
            if step_hook is not None:
                x = step_hook(x, self._t_tensor(t_next, x))
            if callback is not None:
                callback(i, x, x0)
        return x

    def _half_log_snr(self, t: int) -> float:
        """lambda_t = log(alpha_t / sigma_t), alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""
        abar = self.abar_at(t)
        return 0.5 * (math.log(abar) - math.log1p(-abar))

    @torch.no_grad()
    def dpmpp2m_sample(self, model_fn: ModelFn, shape: Optional[Sequence[int]] = None, *,
                       steps: int = 20, x_T: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None,
                       device: Optional[torch.device | str] = None, clip_x0: bool = True,
                       callback: Optional[Callback] = None) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), data prediction.

        `steps` is the number of model evaluations, at timesteps_for(steps). With
        h_i = lambda_{t_i} - lambda_{t_{i-1}} and r_i = h_{i-1} / h_i the update is
            x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
            D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}   (D_1 = x0_0: first order).
        The last two updates are first order ("lower order final", as in the reference
        DPM-Solver code): the jump from t = 0 to clean data has sigma = 0, h = inf and r -> 0,
        so it just returns x0_hat; and on the evenly spaced grid lambda rises steeply into
        t = 0 (r ~ 0.2-0.4 there), where the 2M extrapolation overshoots. On Gaussian data with
        an exact eps this made the error 10-200x smaller in most configurations tested.
        No step_hook: the multistep history makes RePaint-style state edits inconsistent.
        """
        x = self._initial_noise(shape, x_T, generator, device)
        ts = self.timesteps_for(steps).tolist()
        x0_prev: Optional[torch.Tensor] = None
        h_prev = 0.0
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else None
            x0, _ = self.denoise(model_fn, x, t, clip_x0)
            if t_next is None:
                x = x0
            else:
                abar, abar_next = self.abar_at(t), self.abar_at(t_next)
                h = self._half_log_snr(t_next) - self._half_log_snr(t)
                if x0_prev is None or t_next == ts[-1]:
                    d = x0
                else:
                    half_inv_r = h / (2.0 * h_prev)
                    d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
                sigma_ratio = math.sqrt((1.0 - abar_next) / (1.0 - abar))
                x = sigma_ratio * x - math.sqrt(abar_next) * math.expm1(-h) * d
                x0_prev, h_prev = x0, h
            if callback is not None:
                callback(i, x, x0)
        return x

    def sample(self, model_fn: ModelFn, sampler: str, shape: Optional[Sequence[int]] = None, *,
               steps: int = 50, eta: float = 0.0, **kw) -> torch.Tensor:
        """Dispatch to a sampler by name: "ddpm" | "ddim" | "dpmpp2m".

        "ddpm" always runs all T steps and ignores `steps` and `eta`; "dpmpp2m" is
        deterministic and ignores `eta`. Other keywords go to the sampler unchanged.
        """
        if sampler == "ddpm":
            return self.ddpm_sample(model_fn, shape, **kw)
        if sampler == "ddim":
            return self.ddim_sample(model_fn, shape, steps=steps, eta=eta, **kw)
        if sampler == "dpmpp2m":
            return self.dpmpp2m_sample(model_fn, shape, steps=steps, **kw)
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
