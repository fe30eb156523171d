"""python -m dgan.sample --checkpoint PATH --n 64 --sampler ddim --steps 50 --out DIR [--seed S]

Writes one PNG per image (16-bit where the training data was 16-bit) and a grid, from the
EMA generator of a checkpoint. `--class C --guidance W` samples one class with
classifier-free guidance; `--trajectory` also saves the denoising trajectory as a strip.
`--inpaint IMAGE --mask PNG` (white = generate) fills a hole RePaint-style instead; see dgan/inpaint.py.
`--super-resolve LOW.png [--scale 4]` upscales LR images with a model.task=sr checkpoint; see dgan/superres.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


import torch

from dgan import distributed as dist
from dgan.config import positive_int_arg
from dgan.diffusion import SAMPLERS
from dgan.errors import DganError, UsageError, report
from dgan.generation import generate, load_generator, sampler_floor, save_grid, save_image
from dgan.inpaint import add_inpaint_args, inpaint_cli
from dgan.rundir import output_dir
from dgan.superres import super_resolve_cli


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgan.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (runs/<run>/checkpoints/ckpt-*.pt)")
    p.add_argument("--n", type=positive_int_arg, default=None, help="number of images (default 64; --inpaint: completions, 4)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--steps", type=positive_int_arg, default=50, help="sampler steps, 1..T (ddpm always uses T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--t-min", type=int, default=None,
                   help="no sampler step below this timestep (default: the run's diffusion.sample_t_min; "
                        "9 lowered DDIM-50 FID after short runs, see README 'Image quality')")
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
    device = dist.resolve_device(args.device)
    try:
        return _sample_cli(args, device)
    except DganError as e:
        return report(e)


def _sample_cli(args: argparse.Namespace, device: torch.device) -> int:
    plain = args.inpaint is None and args.super_resolve is None  # from noise: all a distilled student can do
    G, cfg, diffusion, meta = load_generator(args.checkpoint, device, sampler_floor(args.sampler, args.t_min),
                                             (args.sampler, args.steps, args.eta) if plain else None)
    if args.label is not None and not 0 <= args.label < max(cfg.model.num_classes, 1):
        raise UsageError(f"--class {args.label} but the model has num_classes={cfg.model.num_classes}")
    if args.sampler != "ddpm" and args.steps > diffusion.num_steps:
        raise UsageError(f"--steps {args.steps}: the model has T={diffusion.num_steps} diffusion steps; "
                         f"use 1..{diffusion.num_steps}")
    if args.super_resolve is not None or cfg.model.task == "sr":  # an SR model cannot sample from noise alone
        return super_resolve_cli(args, G, cfg, diffusion, meta)
    if args.inpaint is not None:
        return inpaint_cli(args, G, cfg, diffusion, device)
    floor = f"-tmin{diffusion.t_min}" if diffusion.t_min and args.sampler != "ddpm" else ""  # kept apart from t_min 0's
    out = Path(args.out or output_dir(args.checkpoint, f"samples-{args.sampler}{args.steps}{floor}"))
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
