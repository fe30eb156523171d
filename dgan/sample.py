"""python -m dgan.sample --checkpoint PATH --n 64 --sampler ddim --steps 50 --out DIR [--seed S]

Writes one PNG per image (16-bit where the training data was 16-bit) and a grid, from the
EMA generator of a checkpoint. `--class C --guidance W` samples one class with
classifier-free guidance; `--trajectory` also saves the denoising trajectory as a strip.
`--inpaint IMAGE --mask PNG` (white = generate) fills a hole RePaint-style instead; see dgan/inpaint.py.
`--super-resolve LOW.png [--scale 4]` upscales LR images with a model.task=sr checkpoint; see dgan/superres.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from dgan.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from dgan.config import Config, config_from_dict, positive_int_arg  # noqa: E402
from dgan.diffusion import Diffusion  # noqa: E402
from dgan.errors import DganError, UsageError, report  # noqa: E402
from dgan.inpaint import add_inpaint_args, inpaint_cli  # noqa: E402
from dgan.models import Generator  # noqa: E402
from dgan.rundir import output_dir  # noqa: E402


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
        kw = {"eta": eta} if sampler == "ddim" else {}
        out.append(diffusion.sample(fn, sampler, x_T=x_T, steps=steps, generator=gen, callback=callback,
                                    **kw).cpu())
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


def load_generator(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, Config, Diffusion, dict]:
    """The EMA generator of a checkpoint, built from the config stored in it."""
    payload = load_checkpoint(checkpoint, map_location="cpu")
    cfg = config_from_dict(payload["metadata"]["config"])
    G = Generator.from_config(cfg.model, encoder_weights=False)  # the checkpoint's weights replace them
    ema = payload["state"]["ema"]
    weights = {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    try:
        G.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: EMA weights do not fit the stored config ({str(e).splitlines()[0]})")
    diffusion = Diffusion.from_config(cfg.diffusion, device=device)
    return G.to(device).eval(), cfg, diffusion, payload["metadata"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgan.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (runs/<run>/checkpoints/ckpt-*.pt)")
    p.add_argument("--n", type=positive_int_arg, default=None, help="number of images (default 64; --inpaint: completions, 4)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpmpp2m"])
    p.add_argument("--steps", type=positive_int_arg, default=50, help="sampler steps, 1..T (ddpm always uses T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--out", default=None, help="output dir (default: <run>/samples-<sampler><steps>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (1 = none)")
    p.add_argument("--batch-size", type=positive_int_arg, default=256)
    p.add_argument("--trajectory", action="store_true", help="also save the x0-prediction trajectory strip")
    p.add_argument("--super-resolve", nargs="+", metavar="LOW.png",
                   help="super-resolve these LR images (model.task=sr checkpoints; see dgan/superres.py)")
    p.add_argument("--scale", type=int, default=None, help="with --super-resolve: must equal the model's sr_scale")
    p.add_argument("--device", default="auto")
    add_inpaint_args(p, mask_file=True)  # --inpaint IMAGE --mask PNG --mask-type --jump-length --jump-n-sample
    args = p.parse_args(argv)
    if not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta {args.eta}: must be in [0, 1]")
    if args.n is None:
        args.n = 4 if args.inpaint is not None else 64
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    try:
        return _sample_cli(args, device)
    except DganError as e:
        return report(e)


def _sample_cli(args: argparse.Namespace, device: torch.device) -> int:
    G, cfg, diffusion, meta = load_generator(args.checkpoint, device)
    if args.label is not None and not 0 <= args.label < max(cfg.model.num_classes, 1):
        raise UsageError(f"--class {args.label} but the model has num_classes={cfg.model.num_classes}")
    if args.sampler != "ddpm" and args.steps > diffusion.num_steps:
        raise UsageError(f"--steps {args.steps}: the model has T={diffusion.num_steps} diffusion steps; "
                         f"use 1..{diffusion.num_steps}")
    if args.super_resolve is not None or cfg.model.task == "sr":  # an SR model cannot sample from noise alone
        from dgan.superres import super_resolve_cli
        return super_resolve_cli(args, G, cfg, diffusion, meta)
    if args.inpaint is not None:
        return inpaint_cli(args, G, cfg, diffusion, device)
    out = Path(args.out or output_dir(args.checkpoint, f"samples-{args.sampler}{args.steps}"))
    out.mkdir(parents=True, exist_ok=True)
    labels = None if args.label is None else torch.full((args.n,), args.label, dtype=torch.long)
    frames: list[torch.Tensor] = []
    callback = (lambda i, x_t, x0: frames.append(x0[:1].cpu())) if args.trajectory else None
    x = generate(G, diffusion, n=args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                 channels=cfg.model.channels, image_size=cfg.model.image_size, num_classes=cfg.model.num_classes,
                 labels=labels, guidance=args.guidance, eta=args.eta, batch_size=args.batch_size, callback=callback)
    bit_depth = int(meta.get("bit_depth", 8))
    for i, img in enumerate(x):
        save_image(img, out / f"{i:05d}.png", bit_depth=bit_depth)
    save_grid(x, out / "grid.png")
    if frames:
        keep = frames[:: max(1, len(frames) // 10)] + [frames[-1]]
        save_grid(torch.cat(keep), out / "trajectory.png", nrow=len(keep))
    print(f"wrote {len(x)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
