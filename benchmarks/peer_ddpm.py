"""The peer arm of benchmarks/quality.py: a plain diffusers DDPM, as in diffusers'
examples/unconditional_image_generation/train_unconditional.py, on the same data and machine.

The recipe (issue 10): UNet2DModel, sample_size 32, 1 channel, layers_per_block 2,
block_out_channels (64, 128, 128, 256), down Down/Down/AttnDown/Down, up Up/AttnUp/Up/Up;
DDPMScheduler linear, 1000 steps; AdamW lr 2e-4, weight decay 1e-6; batch 32; random
horizontal flip; gradient clipping at 1.0; EMA decay min(0.999, (1 + step) / (10 + step));
DDIM 50 for sampling (DDIMScheduler from the same config).

Differences from the example, and why:
- The example's lr schedule is cosine with 500 warm-up steps over the planned run. A 15-minute
  CPU run is about 450 steps, so 500 warm-up steps would keep the peer in warm-up for its whole
  run; we warm up over min(500, 10%) of the planned steps, then decay by cosine to 0, the
  planned steps coming from the same timing probe that plans the dgan arms.
- Sampling starts from each sample's seeded noise (dgan.evaluate.initial_noise), the same
  noise the dgan arms get, so the arms differ only in their model.
- The EMA is our own few lines (diffusers' EMAModel does the same lerp): it saves importing
  diffusers' training utilities, which pull in more optional packages.

diffusers is a benchmark-only dependency (pip install -e ".[bench]"), never a runtime one.
"""
from __future__ import annotations

import math
import time
from typing import Iterator

import torch

BATCH = 32
LR = 2e-4
WEIGHT_DECAY = 1e-6
WARMUP_STEPS = 500
GRAD_CLIP = 1.0


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(64, 128, 128, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def hflip_batches(images: torch.Tensor, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless shuffled batches in [-1, 1], each image flipped left-right with p = 0.5."""
    gen = torch.Generator().manual_seed(seed)
    x = images.to(device).float().div(127.5).sub(1.0)
    while True:
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0] - BATCH + 1, BATCH):
            batch = x[order[start:start + BATCH].to(device)]
            flip = (torch.rand(BATCH, generator=gen) < 0.5).to(device)[:, None, None, None]
            yield torch.where(flip, batch.flip(-1), batch)


def lr_lambda(total_steps: int):
    warmup = max(1, min(WARMUP_STEPS, total_steps // 10))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


class Peer:
    """Model, EMA copy, optimiser and schedule of the peer; `step` is one training step."""

    def __init__(self, total_steps: int, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.device = device
        self.model = build_unet().to(device)
        self.ema = build_unet().to(device).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.scheduler = build_scheduler()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(total_steps))
        self.steps = 0

    def step(self, x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(self.model(noisy, t).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.opt.step()
        self.sched.step()
        decay = min(0.999, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1.0 - decay)
        self.steps += 1
        return loss.detach()


def seconds_per_step(device: torch.device, seed: int, images: torch.Tensor, probe_steps: int = 8) -> float:
    """Time some steps of a throwaway peer (after two warm-up steps) to plan the budgeted run."""
    peer, stream = Peer(10_000, seed, device), hflip_batches(images, seed, device)
    peer.step(next(stream))
    peer.step(next(stream))
    clock = time.perf_counter()
    for _ in range(probe_steps):
        peer.step(next(stream))
    return (time.perf_counter() - clock) / probe_steps


def train_peer(images: torch.Tensor, *, minutes: float, seed: int, device: torch.device, log=print) -> dict:
    """Train for `minutes` of wall clock (the schedule planned by a timing probe); return the EMA
    weights and what was seen."""
    total = max(1, int(minutes * 60 / seconds_per_step(device, seed, images)))
    peer, stream = Peer(total, seed, device), hflip_batches(images, seed, device)
    clock, deadline, losses = time.perf_counter(), time.perf_counter() + minutes * 60, []
    while peer.steps < total and time.perf_counter() < deadline:
        losses.append(peer.step(next(stream)))
        if peer.steps % max(1, total // 10) == 0:
            log(f"peer: step {peer.steps}/{total} loss {float(torch.stack(losses[-50:]).mean()):.4f} "
                f"{peer.steps * BATCH / (time.perf_counter() - clock):.1f} img/s")
    return {"ema": peer.ema.state_dict(), "steps": peer.steps, "planned_steps": total,
            "kimg": peer.steps * BATCH / 1000, "train_s": time.perf_counter() - clock}


@torch.no_grad()
def sample_peer(ema_state: dict, x_T: torch.Tensor, steps: int, batch_size: int = 250) -> torch.Tensor:
    """DDIM (eta 0, diffusers' DDIMScheduler from the training config) from the given noise."""
    from diffusers import DDIMScheduler

    model = build_unet().to(x_T.device)
    model.load_state_dict(ema_state)
    model.eval()
    out = []
    for start in range(0, x_T.shape[0], batch_size):
        scheduler = DDIMScheduler.from_config(build_scheduler().config)
        scheduler.set_timesteps(steps)
        x = x_T[start:start + batch_size]
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
