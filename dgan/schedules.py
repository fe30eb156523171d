"""Noise schedules and sampler timestep grids: plain functions of (T, steps), no tensors on a device.

dgan/diffusion.py builds its tables from `make_betas` and asks `timestep_grid` which timesteps a
DDIM / DPM-Solver++ run of a given length visits.
"""
from __future__ import annotations

import math

import torch


SCHEDULES = ("linear", "cosine")



SPACINGS = ("uniform", "quadratic")



_COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta_0 from being vanishingly small



_MAX_BETA = 0.999  # the cosine schedule's last beta tends to 1; clip it to keep alpha_t > 0



def make_betas(schedule: str, num_steps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """Return the float64 betas [num_steps] of a "linear" or "cosine" schedule.

    beta_start/beta_end only apply to "linear"; the cosine schedule is parameter-free.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                "need 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}")
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
        # betas from ratios of the continuous alpha_bar, so alpha_bar follows the cosine curve
        return (1.0 - f[1:] / f[:-1]).clamp(max=_MAX_BETA)
    raise ValueError(f"unknown beta schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


def timestep_grid(num_steps: int, steps: int, spacing: str, t_min: int = 0) -> torch.LongTensor:
    """`steps` distinct timesteps from T-1 down to at least t_min (CPU LongTensor) on a T = num_steps
    schedule.

    uniform: evenly from T-1 to t_min. quadratic: t_k = T (k/steps)^2 - 1 for k = steps..1 (the
    DDIM paper's quadratic grid, "trailing" so it starts exactly at T-1). It spends the
    evaluations where the image's detail is decided, near t = 0; the uniform grid jumps from
    t = 111 (noise std 0.37) to clean in one step at 10 steps. Measured on PneumoniaMNIST
    (RESULTS.md): FID at DDIM 10 1.43 -> 0.81, at DDIM 50 0.36 -> 0.26, same weights.

    t_min: no evaluation below it (the quadratic grid's points under it are lifted to t_min,
    t_min + 1, ...); when `steps` leaves no room, it drops to T - steps. Why (diffusion.sample_t_min):
    after a short run DDIM 50's steps below t = 9 left its samples grainier than the data: there the
    deterministic update puts G's own eps estimate back in, and G cannot yet tell it from texture
    (RESULTS.md, issue 10).
    """
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be in 1..{num_steps}, got {steps}")
    if t_min < 0:
        raise ValueError(f"t_min must be >= 0, got {t_min}")
    floor = min(t_min, num_steps - steps)  # room for `steps` distinct timesteps in [floor, T-1]
    if spacing == "uniform":
        # spacing >= 1 whenever steps <= T - floor, so rounding can never merge two timesteps
        return torch.linspace(num_steps - 1, floor, steps, dtype=torch.float64).round().long()
    k = torch.arange(steps, 0, -1, dtype=torch.float64)
    grid = (num_steps * (k / steps) ** 2 - 1).round().clamp(min=floor).long()
    # Near the floor the quadratic grid is denser than one step when steps > sqrt(T): keep the
    # timesteps distinct by lifting each, from the bottom up, to at least one above the next.
    for i in range(steps - 2, -1, -1):
        grid[i] = max(int(grid[i]), int(grid[i + 1]) + 1)
    return grid
