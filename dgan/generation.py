"""Generating from a generator: the one owner of "load an EMA generator from a checkpoint", the
seeded, world-size-independent sampling loop, classifier-free guidance, and the SR condition.

Training (step.py, train.py), the CLIs (sample, evaluate, visualize) and the tasks (inpaint,
superres) all come here, so that a sample means the same thing everywhere.

Seeding. Sample i starts from noise seeded by (seed, i) only (`initial_noise`), so a sample set
does not depend on the batch size or on the number of ranks; rank r generates the indices with
i % world_size == r and rank 0 gathers them in index order (`generate_distributed`).

The condition. A model.task=sr generator sees the bicubic-upsampled LR image as extra input
channels (`sr_condition`), made the same way from an HR batch in training and from an LR image
at sampling time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.utils import make_grid

from dgan import distributed as dist
from dgan.checkpoint import CheckpointError, load_checkpoint
from dgan.config import Config, config_from_dict
from dgan.diffusion import Diffusion
from dgan.errors import EvalError, UsageError
from dgan.models import Generator
from dgan.pixels import to_uint8
from dgan.seeding import Stream, stream_generator



def make_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """B x C x H x W HR images -> B x C x H/scale x W/scale LR by area averaging (see module doc)."""
    return F.avg_pool2d(hr, kernel_size=scale, stride=scale)


def upsample(lr: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling to size x size, clamped to the data range [-1, 1] (bicubic overshoots)."""
    return F.interpolate(lr, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def sr_condition(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The generator's condition for an HR batch: its LR, upsampled back to the HR size."""
    return upsample(make_lr(hr, scale), hr.shape[-1])


def guided_model_fn(G: torch.nn.Module, labels: Optional[torch.Tensor], guidance: float,
                    cond: Optional[torch.Tensor] = None) -> Callable:
    """G's output (eps or v) at (x_t, t) for the sampler. With labels and guidance != 1,
    classifier-free guidance: out_uncond + w * (out_cond - out_uncond), both from one batched
    forward. At fixed (x_t, t), eps, v and x0 are affine in each other, so guiding v is guiding eps."""
    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if labels is None or guidance == 1.0:
            return G(x_t, t, labels, cond) if cond is not None else G(x_t, t, labels)
        null = torch.full_like(labels, -1)
        x2, t2, y2 = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])
        c2 = None if cond is None else torch.cat([cond, cond])
        eps_c, eps_u = (G(x2, t2, y2, c2) if c2 is not None else G(x2, t2, y2)).chunk(2)
        return eps_u + guidance * (eps_c - eps_u)
    return fn


@torch.no_grad()
def generate(G: torch.nn.Module, diffusion: Diffusion, *, n: int, sampler: str = "ddim", steps: int = 50,
             seed: int = 0, channels: int, image_size: int, num_classes: int = 0,
             labels: Optional[torch.Tensor] = None, guidance: float = 1.0, eta: float = 0.0,
             batch_size: int = 256, callback=None) -> torch.Tensor:
    """n images in [-1, 1] on the CPU. Uses its own generator, so the training RNG stream
    (and therefore exact resume) is untouched by sampling."""
    if getattr(G, "cond_channels", 0):
        raise ValueError("this generator is conditioned on an LR image (model.task=sr): use "
                         "dgan.superres.super_resolve, or python -m dgan.sample --super-resolve LOW.png")
    device = next(G.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = G.training
    G.eval()
    if labels is None and num_classes > 0:
        labels = torch.arange(n) % num_classes  # a balanced grid, one class per column cycle
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        y = None if labels is None else labels[start:start + m].to(device)
        x_T = torch.randn((m, channels, image_size, image_size), generator=gen, device=device)
        fn = guided_model_fn(G, y, guidance)
        out.append(diffusion.sample(fn, sampler, x_T=x_T, steps=steps, eta=eta, generator=gen,
                                    callback=callback).cpu())  # only DDIM reads eta
    G.train(was_training)
    return torch.cat(out)


def save_grid(x: torch.Tensor, path: Path, nrow: Optional[int] = None) -> Path:
    """An 8-bit PNG grid of images in [-1, 1]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(x)))))
    grid = make_grid((x.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    arr = (grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    Image.fromarray(arr[..., 0] if x.shape[1] == 1 else arr).save(path)
    return path


def save_image(x: torch.Tensor, path: Path, bit_depth: int = 8) -> None:
    """One image in [-1, 1] (C,H,W) as PNG; 16-bit grayscale keeps the full precision."""
    v = ((x.clamp(-1, 1) + 1) / 2).numpy()
    if bit_depth == 16 and x.shape[0] == 1:
        Image.fromarray((v[0] * 65535).round().astype(np.uint16)).save(path)
        return
    arr = (v * 255).round().astype(np.uint8).transpose(1, 2, 0)
    Image.fromarray(arr[..., 0] if x.shape[0] == 1 else arr).save(path)


def sampler_floor(sampler: str, t_min: Optional[int]) -> Optional[int]:
    """The CLIs' --t-min, refused with DDPM (it runs every timestep, so a floor would be silently ignored)."""
    if t_min is not None and sampler == "ddpm":
        raise UsageError("--t-min with --sampler ddpm: DDPM runs all T steps; drop --t-min or use ddim / dpmpp2m")
    return t_min


def check_student(checkpoint: str | Path, meta: dict, sampling: Optional[tuple[str, int, float]],
                  t_min: Optional[int]) -> None:
    """A distilled student (dgan.distill) learnt one sampler, step count and grid; `sampling` (sampler,
    steps, eta) and --t-min must be those. None: any other use of G (inpainting, reconstructions,
    pictures, training on). Why refuse, not warn: used any other way it does worse than its teacher,
    silently, since its x0 is no longer the posterior mean."""
    student = meta.get("student")
    if student is None:
        return
    n, teacher = student.get("steps", "?"), student.get("teacher", "its teacher")
    if sampling is None:
        raise UsageError(f"{checkpoint} is a DDIM-{n} student (dgan.distill): it only makes samples from noise with "
                         f"--sampler ddim --steps {n} (dgan.sample, dgan.evaluate --fid/--kid, dgan.export); use its "
                         f"teacher {teacher} for inpainting, PSNR/SSIM reconstructions and everything else")
    if tuple(sampling) != ("ddim", n, 0.0):
        raise UsageError(f"{checkpoint} is a DDIM-{n} student (dgan.distill): sample it with --sampler ddim "
                         f"--steps {n} and no --eta, or sample its teacher {teacher} any other way")
    if t_min is not None and t_min != student.get("t_min"):
        raise UsageError(f"--t-min {t_min}: {checkpoint} learnt the DDIM-{n} grid down to t = {student.get('t_min')}; "
                         "drop --t-min")


def load_generator(checkpoint: str | Path, device: torch.device, t_min: Optional[int] = None,
                   sampling: Optional[tuple[str, int, float]] = None) -> tuple[torch.nn.Module, Config, Diffusion, dict]:
    """The EMA generator of a checkpoint, built from the config stored in it; `t_min` (the CLIs' --t-min)
    replaces its diffusion.sample_t_min, the samplers' lowest timestep. `sampling`: (sampler, steps,
    eta) the caller will sample with from noise, or None for any other use; a distilled student refuses
    all but its own (check_student)."""
    payload = load_checkpoint(checkpoint, map_location="cpu")
    check_student(checkpoint, payload["metadata"], sampling, t_min)
    cfg = config_from_dict(payload["metadata"]["config"])
    G = Generator.from_config(cfg.model, encoder_weights=False)  # the checkpoint's weights replace them
    ema = payload["state"]["ema"]
    weights = {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    try:
        G.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: EMA weights do not fit the stored config ({str(e).splitlines()[0]})")
    if t_min is not None:
        cfg.diffusion.sample_t_min = t_min
    try:  # Diffusion owns the range check; here a bad floor can only come from the command line
        diffusion = Diffusion.from_config(cfg.diffusion, device=device)
    except ValueError as e:
        raise UsageError(f"--t-min {t_min}: {e}; 9 is the 10-step grid's last timestep, 0 goes down to t = 0")
    return G.to(device).eval(), cfg, diffusion, payload["metadata"]




def initial_noise(indices: Sequence[int], seed: int, shape: Sequence[int],
                  stream: Stream = Stream.INITIAL_NOISE) -> torch.Tensor:
    """x_T for the given sample indices, on the CPU: sample i's noise depends on (seed, i) only
    (`stream`: another set of noises, e.g. distillation's, which no sample index can draw)."""
    out = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices):
        gen = stream_generator(None, seed, stream, index)
        out[row] = torch.randn(tuple(shape), generator=gen)
    return out


def rank_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """This rank's disjoint share of 0..N-1 (i % world_size == rank); together they cover each once."""
    return list(range(rank, num_samples, world_size))


@torch.no_grad()
def generate_indices(G: torch.nn.Module, diffusion, indices: Sequence[int], *, sampler: str, steps: int,
                     seed: int, channels: int, image_size: int, num_classes: int, batch_size: int,
                     device: torch.device, guidance: float = 1.0, eta: float = 0.0) -> torch.Tensor:
    """Samples (float [-1, 1], CPU) for the given indices, in that order, from the EMA generator.
    Conditional models: sample i has label i % num_classes, drawn with classifier-free `guidance`.
    eta: DDIM's fresh noise (other samplers have no such setting)."""
    shape = (channels, image_size, image_size)
    out = [torch.empty((0, *shape))]
    was_training = G.training
    G.eval()
    try:
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start:start + batch_size])
            x_T = initial_noise(chunk, seed, shape).to(device)
            labels = torch.tensor(chunk, device=device) % num_classes if num_classes > 0 else None
            # DDPM (and DDIM with eta > 0) draws fresh noise at every step; its stream is seeded by the
            # batch's first index.
            step_gen = stream_generator(device, seed, Stream.STEP_NOISE, chunk[0])
            x = diffusion.sample(guided_model_fn(G, labels, guidance), sampler, x_T=x_T, steps=steps,
                                 eta=eta, generator=step_gen)  # only DDIM reads eta
            out.append(x.cpu())
    finally:
        G.train(was_training)
    return torch.cat(out)


def gather_in_order(indices: Sequence[int], images: torch.Tensor,
                    num_samples: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Collective. Rank 0 gets (exactly N images in index order, the rank that made each); others None.

    Raises when the gathered indices are not exactly 0..N-1 once each: a duplicate or a gap would
    silently bias FID/KID.
    """
    parts = dist.all_gather_object((list(indices), images))
    if not dist.is_main():
        return None, None
    gathered = [i for part_indices, _ in parts for i in part_indices]
    if sorted(gathered) != list(range(num_samples)):
        raise EvalError(f"gathered {len(gathered)} sample indices ({len(set(gathered))} distinct), "
                        f"expected exactly 0..{num_samples - 1}")
    ranks = torch.tensor([rank for rank, (part, _) in enumerate(parts) for _ in part], dtype=torch.int64)
    order = torch.tensor(gathered, dtype=torch.int64).argsort()
    return torch.cat([part_images for _, part_images in parts])[order], ranks[order]


def generate_distributed(G: torch.nn.Module, diffusion, cfg, *, num_samples: int, sampler: str, steps: int,
                         seed: int, batch_size: int, device: torch.device,
                         guidance: float = 1.0, eta: float = 0.0
                         ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Collective: every rank generates its share; rank 0 gets N uint8 samples (and their ranks)."""

    mine = rank_indices(num_samples, dist.get_rank(), dist.get_world_size())
    x = generate_indices(G, diffusion, mine, sampler=sampler, steps=steps, seed=seed,
                         channels=cfg.model.channels, image_size=cfg.model.image_size,
                         num_classes=cfg.model.num_classes, batch_size=batch_size, device=device,
                         guidance=guidance, eta=eta)
    # uint8 before the gather: a quarter of the bytes, and exactly what FID/KID score.
    return gather_in_order(mine, to_uint8(x), num_samples)
