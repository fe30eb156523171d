"""DDIM timestep grids on trained weights: FID/KID of the same checkpoints, the same seeded noise,
only the grid changes. Reads a benchmarks/quality.py --out folder (its data.pt, extractor.pt and
<arm>.pt files), so it measures the weights quality.py trained.

    python benchmarks/spacing.py runs/cmp0 --arms hybrid,diffusion --steps 10,50

Grids: `uniform` and `quadratic` are dgan's `diffusion.timestep_spacing` options; `trailing`
(evenly spaced, ending at T/steps - 1), `logsnr` (evenly spaced in log-SNR) and `edm` (Karras et
al. 2022, rho = 7 in sigma) are the usual alternatives, built here for comparison only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/ is not a package)

from dgan.diffusion import Diffusion  # noqa: E402
from dgan.generation import generate_indices  # noqa: E402
from dgan.metrics import fid_kid, to_uint8  # noqa: E402
from dgan.trainer import build_models  # noqa: E402

GRIDS = ("uniform", "quadratic", "trailing", "logsnr", "edm")


def nearest(table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.argmin((table - v).abs()) for v in targets]).long()


def grid(diffusion: Diffusion, kind: str, steps: int) -> torch.Tensor:
    T, abar = diffusion.num_steps, diffusion.alpha_bar.double().cpu()
    if kind in ("uniform", "quadratic"):
        diffusion.spacing = kind
        return diffusion.timesteps_for(steps)
    if kind == "trailing":
        return (torch.arange(T, 0, -T / steps, dtype=torch.float64) - 1).round().long()
    if kind == "logsnr":
        lam = torch.log(abar / (1 - abar))
        return nearest(lam, torch.linspace(float(lam[T - 1]), float(lam[0]), steps, dtype=torch.float64))
    sigma = ((1 - abar) / abar).sqrt()  # edm
    lo, hi, rho = float(sigma[0]) ** (1 / 7), float(sigma[T - 1]) ** (1 / 7), 7.0
    return nearest(sigma, (hi + torch.linspace(0, 1, steps, dtype=torch.float64) * (lo - hi)) ** rho)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--arms", default="hybrid,diffusion")
    p.add_argument("--steps", default="10,50")
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args(argv)
    data = torch.load(args.out / "data.pt", weights_only=True)
    qargs = quality.parse_args(["--out", str(args.out)])
    print("| arm | steps | grid | timesteps | FID | KID |\n|---|---:|---|---|---:|---:|")
    for arm in args.arms.split(","):
        cfg = quality.run_config(qargs, arm)
        G, _ = build_models(cfg, torch.device("cpu"))
        G.load_state_dict(torch.load(args.out / f"{arm}.pt", weights_only=True)["ema"])
        for steps in map(int, args.steps.split(",")):
            for kind in args.grids.split(","):
                diffusion = Diffusion.from_config(cfg.diffusion)
                ts = grid(diffusion, kind, steps)
                diffusion.timesteps_for = lambda n, ts=ts: ts  # this instance samples on this grid
                clock = time.perf_counter()
                x = generate_indices(G, diffusion, range(args.samples), sampler="ddim", steps=steps, seed=qargs.seed,
                                     channels=1, image_size=32, num_classes=0, batch_size=500,
                                     device=torch.device("cpu"))
                s = fid_kid(data["ref_images"], to_uint8(x), extractor_path=args.out / "extractor.pt", batch_size=256)
                shown = ts.tolist() if steps <= 10 else f"{ts[:3].tolist()}...{ts[-3:].tolist()}"
                print(f"| {arm} | {steps} | {kind} | {shown} | {s['fid']:.3f} | {s['kid']:.4f} |  "
                      f"<!-- {time.perf_counter() - clock:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
