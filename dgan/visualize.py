"""python -m dgan.visualize: pictures that explain a run.

    python -m dgan.visualize forward [--config PATH [key=value ...] | --run DIR] --out strip.png
        the forward diffusion q(x_t | x0) of a few real images at t = 0, 50, 100, 200, 400, 600, 800, 999
        (one row per image, one column per t, labelled on top)
    python -m dgan.visualize samplers --checkpoint PATH --out samplers.png [--n 8] [--ddim-steps 50]
        DDPM over all T steps (top row) next to DDIM (bottom row) from the same initial noise, with the
        wall time of each written above the grid (first line: top row) and into <out>.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from dgan import distributed as dist
from dgan.config import int_list_arg, load_config
from dgan.diffusion import Diffusion
from dgan.errors import EXIT_ERROR, DganError, report
from dgan.generation import guided_model_fn, initial_noise, load_generator, save_grid

FORWARD_T_VALUES = (0, 50, 100, 200, 400, 600, 800, 999)
GRID_PADDING = 2  # dgan.sample.save_grid's padding, needed to place column labels
HEADER_LINE_PX = 14  # one line of the default PIL font, with a little air


def header_height(lines: int) -> int:
    """Height in pixels of the text band that sits above a grid with ``lines`` lines of text."""
    return HEADER_LINE_PX * lines + 2


def add_header(path: Path, lines: Sequence[str], column_labels: Optional[Sequence[str]] = None,
               cell: int = 0) -> Path:
    """Prepend a white band with text lines (and/or one label per grid column) to the PNG at path."""
    grid = Image.open(path)
    rows = len(lines) + (1 if column_labels else 0)
    band = header_height(rows)
    out = Image.new(grid.mode, (grid.width, grid.height + band), color=255 if grid.mode == "L" else (255,) * 3)
    out.paste(grid, (0, band))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    ink = 0 if grid.mode == "L" else (0, 0, 0)
    for i, text in enumerate(lines):
        draw.text((GRID_PADDING, 1 + i * HEADER_LINE_PX), text, fill=ink, font=font)
    for j, text in enumerate(column_labels or ()):
        x = GRID_PADDING + j * (cell + GRID_PADDING)
        draw.text((x, 1 + len(lines) * HEADER_LINE_PX), text, fill=ink, font=font)
    out.save(path)
    return path


# --------------------------------------------------------------------------------------------------
# forward: q(x_t | x0) of real images
# --------------------------------------------------------------------------------------------------


def forward_strip(cfg, *, n: int, t_values: Sequence[int], split: str, seed: int) -> torch.Tensor:
    """Images [n * len(t_values), C, H, W] in [-1, 1], row-major: image 0 at every t, then image 1, ..."""
    from dgan.data import build_eval_images  # albumentations/webdataset: slow to import

    diffusion = Diffusion.from_config(cfg.diffusion)
    bad = [t for t in t_values if not 0 <= t < diffusion.num_steps]
    if bad:
        raise ValueError(f"t values {bad} outside 0..{diffusion.num_steps - 1} (diffusion.num_steps="
                         f"{diffusion.num_steps}); pass --t-values")
    x0, _ = build_eval_images(cfg.data, image_size=cfg.model.image_size, channels=cfg.model.channels,
                              split=split, max_images=n)
    # One noise draw per image, shared by all t: each row then shows one path of the forward process.
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    columns = []
    for t in t_values:
        tb = torch.full((x0.shape[0],), int(t), dtype=torch.long)
        columns.append(diffusion.q_sample(x0, tb, eps))
    return torch.stack(columns, dim=1).flatten(0, 1)


def load_visualize_config(config: Optional[str], run: Optional[str], overrides: Sequence[str]):

    if run is not None:
        path = Path(run) / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"--run {run}: no config.yaml (is it a dgan run directory?)")
        return load_config(path, overrides)
    return load_config(config, overrides)


def cmd_forward(args: argparse.Namespace) -> int:

    cfg = load_visualize_config(args.config, args.run, args.overrides)
    x = forward_strip(cfg, n=args.n, t_values=args.t_values, split=args.split, seed=args.seed)
    out = save_grid(x, Path(args.out), nrow=len(args.t_values))
    add_header(out, [], [f"t={t}" for t in args.t_values], cell=cfg.model.image_size)
    print(f"wrote {out}: {x.shape[0] // len(args.t_values)} images x t = {', '.join(map(str, args.t_values))}")
    return 0


# --------------------------------------------------------------------------------------------------
# samplers: DDPM-T next to DDIM-S from the same noise
# --------------------------------------------------------------------------------------------------


def _timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    x = fn()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)  # GPU work is asynchronous; time the finished samples
    return x.cpu(), time.perf_counter() - start


def compare_samplers(G, diffusion, cfg, *, n: int, ddim_steps: int, seed: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(DDPM samples, DDIM samples, {"ddpm": {"steps", "seconds"}, "ddim": {...}}), same x_T for both."""

    m = cfg.model
    x_T = initial_noise(range(n), seed, (m.channels, m.image_size, m.image_size)).to(device)
    labels = torch.arange(n, device=device) % m.num_classes if m.num_classes > 0 else None
    fn = guided_model_fn(G, labels, 1.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        ddpm, ddpm_s = _timed(lambda: diffusion.sample(fn, "ddpm", x_T=x_T.clone(), generator=gen))
        ddim, ddim_s = _timed(lambda: diffusion.sample(fn, "ddim", x_T=x_T.clone(), steps=ddim_steps, eta=0.0))
    timing = {"ddpm": {"steps": diffusion.num_steps, "seconds": round(ddpm_s, 3)},
              "ddim": {"steps": ddim_steps, "seconds": round(ddim_s, 3)}}
    return ddpm, ddim, timing


def cmd_samplers(args: argparse.Namespace) -> int:

    device = dist.resolve_device(args.device)
    G, cfg, diffusion, _ = load_generator(args.checkpoint, device)
    if not 1 <= args.ddim_steps <= diffusion.num_steps:
        raise ValueError(f"--ddim-steps {args.ddim_steps}: must be in 1..{diffusion.num_steps}")
    ddpm, ddim, timing = compare_samplers(G, diffusion, cfg, n=args.n, ddim_steps=args.ddim_steps,
                                          seed=args.seed, device=device)
    out = save_grid(torch.cat([ddpm, ddim]), Path(args.out), nrow=args.n)
    # One line per grid row, in row order; short, so that a narrow grid still shows the numbers.
    lines = [f"DDPM-{timing['ddpm']['steps']} {timing['ddpm']['seconds']:.2f}s",
             f"DDIM-{timing['ddim']['steps']} {timing['ddim']['seconds']:.2f}s"]
    add_header(out, lines)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({**timing, "n": args.n, "seed": args.seed, "device": str(device),
                                   "checkpoint": str(Path(args.checkpoint).resolve()), "image": str(out)},
                                  indent=2) + "\n")
    print(f"DDPM-{timing['ddpm']['steps']}: {timing['ddpm']['seconds']:.2f} s; "
          f"DDIM-{timing['ddim']['steps']}: {timing['ddim']['seconds']:.2f} s ({args.n} images on {device})")
    print(f"wrote {out} and {sidecar}")
    return 0


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgan.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="forward-diffusion strip of real images")
    where = fwd.add_mutually_exclusive_group()
    where.add_argument("--config", help="a YAML config (default: the built-in defaults)")
    where.add_argument("--run", help="a run directory: its config.yaml")
    fwd.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.source=npz")
    fwd.add_argument("--out", required=True, help="PNG to write")
    fwd.add_argument("--n", type=_positive, default=4, help="number of real images (rows)")
    fwd.add_argument("--split", default="val", choices=["val", "train"], help="which images to show")
    fwd.add_argument("--t-values", type=int_list_arg, default=FORWARD_T_VALUES, help="columns, e.g. 0,100,999")
    fwd.add_argument("--seed", type=int, default=0)
    smp = sub.add_parser("samplers", help="DDPM-T next to DDIM-S from the same initial noise, timed")
    smp.add_argument("--checkpoint", required=True, help="a checkpoint file (its EMA generator is used)")
    smp.add_argument("--out", required=True, help="PNG to write; the timings also go to <out>.json")
    smp.add_argument("--n", type=_positive, default=8, help="images per sampler")
    smp.add_argument("--ddim-steps", type=_positive, default=50)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return cmd_forward(args) if args.command == "forward" else cmd_samplers(args)
    except DganError as err:
        return report(err, "dgan.visualize")
    except (FileNotFoundError, ValueError) as err:  # e.g. a --steps the sampler refuses
        print(f"dgan.visualize: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
