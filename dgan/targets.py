"""What each diffusion row of a training batch learns: the posterior mean (the target of x0 and eps,
Diffusion.training_target) or, for a share of the rows (diffusion.shortcut_fraction), a shortcut:
G's own two half steps, so that one large DDIM step lands where two smaller ones do.

Why: the diffusion loss teaches the posterior mean E[x0 | x_t], the right x0_hat for a vanishing
step. A large DDIM step (DDIM 10's are about 0.5 of the way, `schedules.jump_size`) built on it
blurs, and the adversarial term's sharpening cannot tell large steps from small ones, so it
over-sharpens DDIM 50 before it lifts DDIM 10 (benchmarks/RESULTS.md, issue 10). A G told the step
size (model.step_size_conditioning) can be taught a different x0_hat per size: the one whose single
DDIM step from t reaches the state that two half steps of G itself reach (no grad). The half steps
use G's own shortcut for their size, so the targets bootstrap from small steps, whose posterior
mean is nearly exact, up to large ones (the self-consistency of shortcut models, Frans et al. 2024,
here on DDIM's update rather than a flow).

The steps are those of the sampler's quadratic grid (schedules.timestep_grid): on an N-step grid,
t_k = T (k/N)^2 - 1 for k = N..1 and -1 (clean data) for k = 0; the midpoint of a step is k - 1/2,
a point of the 2N-step grid. N is drawn per row from 4..20 (fewer when T is small, so that the
half steps stay distinct timesteps).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from dgan.config import Config
from dgan.diffusion import Diffusion
from dgan.schedules import jump_size

# (x_t, t, step_size) -> G's raw output; the caller binds labels and conditioning
GFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

MIN_GRID, MAX_GRID = 4, 20


def grid_range(num_steps: int) -> tuple[int, int]:
    """The grid lengths N that draw_jumps draws from. T / N^2 >= 2.5 keeps t_1 > m_1 > clean on the
    finest grid (t_1 = T/N^2 - 1 must round above m_1 = T/(4 N^2) - 1, which must round to >= 0)."""
    hi = max(1, min(MAX_GRID, int(math.sqrt(num_steps / 2.5))))
    return min(MIN_GRID, hi), hi


def draw_jumps(n: int, num_steps: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, m, s) [n]: a step t -> s of an N-step quadratic grid and its midpoint m, N and the step
    drawn uniformly per row (on the default generator, like the batch's t); s = -1 is clean data."""
    lo, hi = grid_range(num_steps)
    N = torch.randint(lo, hi + 1, (n,), device=device).double()
    k = (torch.rand(n, device=device, dtype=torch.float64) * N).floor() + 1  # uniform in 1..N

    def point(u: torch.Tensor) -> torch.Tensor:
        return (num_steps * (u / N) ** 2 - 1).round().long()

    t, m, s = point(k), point(k - 0.5), point(k - 1)
    return t, torch.minimum(torch.maximum(m, s + 1), t - 1), s


def _abar(diffusion: Diffusion, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at each t [n] (-1: clean data, 1), shaped [n, 1, 1, 1] in float32."""
    table = diffusion.alpha_bar.to(t.device)
    abar = torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), dtype=table.dtype, device=t.device))
    return abar.float().view(-1, 1, 1, 1)


def _ddim_jump(x: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor, abar_next: torch.Tensor) -> torch.Tensor:
    """Diffusion.ddim_step at eta 0, per row: the state at abar_next on the line through x and x0."""
    eps = (x - abar.sqrt() * x0) / (1.0 - abar).sqrt()
    return abar_next.sqrt() * x0 + (1.0 - abar_next).sqrt() * eps


def _x0_hat(g: GFn, diffusion: Diffusion, x: torch.Tensor, t: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    return diffusion.model_x0(x, t, g(x, t, size).float()).clamp(-1.0, 1.0)  # clipped, as the samplers do


@torch.no_grad()
def shortcut_targets(g: GFn, diffusion: Diffusion, x_t: torch.Tensor, t: torch.Tensor, m: torch.Tensor,
                     s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 target [n, ...], step size [n]) for one DDIM step from (x_t, t) to s: the x0 whose single
    step lands on G's own two half steps t -> m -> s. Solved from the DDIM update
    x_s = sqrt(abar_s) x0 + k (x_t - sqrt(abar_t) x0), k = sqrt((1 - abar_s) / (1 - abar_t)), whose x0
    coefficient sqrt(abar_s) - k sqrt(abar_t) = sqrt(abar_s) c is never 0 for a real step. Clipped
    to the data range, like every x0_hat the samplers use."""
    a_t, a_m, a_s = _abar(diffusion, t), _abar(diffusion, m), _abar(diffusion, s)
    x_m = _ddim_jump(x_t, _x0_hat(g, diffusion, x_t, t, jump_size(a_t, a_m).flatten()), a_t, a_m)
    x_s = _ddim_jump(x_m, _x0_hat(g, diffusion, x_m, m, jump_size(a_m, a_s).flatten()), a_m, a_s)
    k = ((1.0 - a_s) / (1.0 - a_t)).sqrt()
    target = (x_s - k * x_t) / (a_s.sqrt() - k * a_t.sqrt())
    return target.clamp(-1.0, 1.0), jump_size(a_t, a_s).flatten()


def shortcut_rows(batch: int, fraction: float, reserved: int) -> int:
    """How many rows of a batch take a shortcut target: fraction x batch, leaving the first `reserved`
    (the recon fakes, which need the diffusion sample's own t) alone. A host number: no sync."""
    return max(0, min(int(fraction * batch), batch - reserved))


def g_fn(G: torch.nn.Module, y: Optional[torch.Tensor], cond: Optional[torch.Tensor]) -> GFn:
    """G (a step-size-conditioned Generator) with the rows' labels and conditioning bound."""
    return lambda x, t, size: G(x, t, y, cond, size)


def diffusion_batch(G: torch.nn.Module, diffusion: Diffusion, cfg: Config, x0: torch.Tensor, t: torch.Tensor,
                    y: Optional[torch.Tensor], cond: Optional[torch.Tensor], reserved: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(t, x_t, target, step sizes or None) of a batch's diffusion samples, from t [B] drawn uniformly.
    With shortcuts, the last rows (never the `reserved` first) take a step of a DDIM grid for their t,
    G's (the plain module's, no grad) two half steps for their target, and that step's size; every
    other row learns the posterior mean at step size 0. y: the labels G sees (after any dropout)."""
    B, dev = x0.shape[0], x0.device
    eps = torch.randn_like(x0)
    n_sc = shortcut_rows(B, cfg.diffusion.shortcut_fraction, reserved)
    if n_sc:
        t_sc, m_sc, s_sc = draw_jumps(n_sc, diffusion.num_steps, dev)
        t = torch.cat([t[:B - n_sc], t_sc])
    x_t = diffusion.q_sample(x0, t, eps)
    target = diffusion.training_target(x0, t, eps)
    sizes = torch.zeros(B, device=dev) if cfg.model.step_size_conditioning else None
    if n_sc:
        rows = slice(B - n_sc, B)
        g = g_fn(G, None if y is None else y[rows], None if cond is None else cond[rows])
        x0_sc, sizes[rows] = shortcut_targets(g, diffusion, x_t[rows], t_sc, m_sc, s_sc)
        target[rows] = diffusion.training_target(x0_sc, t_sc, diffusion.predict_eps(x_t[rows], t_sc, x0_sc))
    return t, x_t, target, sizes
