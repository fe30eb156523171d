"""The command line of a script that reads the trained arms of a benchmarks/quality.py --out folder
(sample_floor.py, sample_eta.py, low_t.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

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
