"""What the scripts that read the trained arms of a benchmarks/quality.py --out folder share
(sample_floor.py, step_count.py, sample_eta.py, low_t.py): their command line, and a samples cell
kept beside quality.py's."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dgan.atomic import torch_save_atomic

import quality  # benchmarks/ is not a package: its scripts put it on sys.path first


def folder_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a script that reads a quality.py --out folder's trained arms (sample_floor.py, sample_eta.py,
    low_t.py): the folder, and the --seed and --preset it was made with."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a benchmarks/quality.py --out folder")
    p.add_argument("--seed", type=int, required=True, help="the seed the folder was made with")
    p.add_argument("--preset", default="ablation", choices=sorted(quality.PRESETS))
    p.add_argument("--arms", required=True, help="comma-separated trained dgan arms in the folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def folder_args(a: argparse.Namespace) -> argparse.Namespace:
    """quality.py's own arguments for the folder of a folder_parser command."""
    if quality.PEER in a.arms.split(","):
        raise SystemExit(f"--arms: '{quality.PEER}' is the diffusers DDPM, which has no dgan sampler settings or "
                         "x0 estimate to read: leave it out")
    return quality.parse_args(["--preset", a.preset, "--seed", str(a.seed), "--out", str(a.out), "--no-frd",
                               "--device", a.device])


def kept_cell(args: argparse.Namespace, out: Path, arm: str, sampler: str, steps: int, n: int, t_min: int,
              script: str) -> torch.Tensor:
    """n uint8 samples of one arm, sampler and floor (diffusion.sample_t_min), kept in the script's own
    samples-ARM-SAMPLERSTEPS-tminT.pt, reused and extended, never cut. For t_min 0, quality.py's own
    samples-ARM-SAMPLERSTEPS.pt is used when it holds all n; it is only read (its score phase needs its count)."""
    sampling, clock = (f"diffusion.sample_t_min={t_min}",), time.perf_counter()
    stock = out / f"samples-{arm}-{sampler}{steps}.pt"
    kept = quality.samples_to_keep(args, out, arm, sampler, steps, stock, n, sampling) if t_min == 0 else None
    path = out / f"samples-{arm}-{sampler}{steps}-tmin{t_min}.pt"
    if kept is None or kept.shape[0] < n:
        kept = quality.samples_to_keep(args, out, arm, sampler, steps, path, n, sampling)
        if kept is None and path.is_file():
            raise SystemExit(f"{script}: {path} was not drawn from {arm}.pt with --seed {args.seed}, or cannot "
                             f"be extended to {n} images: check --seed and --preset, or delete it to draw it again")
    fake, first = quality.extend_cell(args, out, arm, sampler, steps, n, kept, sampling)
    if first < n:
        torch_save_atomic(fake, path)  # a kill mid-save must not leave a truncated file of kept samples
    print(f"  {arm} {sampler}{steps} t_min {t_min}: {n - first} drawn in {time.perf_counter() - clock:.0f} s, "
          f"{first} kept", file=sys.stderr, flush=True)
    return fake
