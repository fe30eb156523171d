"""DDIM timestep grids on trained weights: FID/KID of the same checkpoints, the same seeded noise,
only the grid changes. Reads a benchmarks/quality.py --out folder (its data.pt, extractor.pt and
<arm>.pt files), so it measures the weights quality.py trained.

    python benchmarks/spacing.py runs/cmp0 --arms hybrid,diffusion --steps 10,50
    python benchmarks/spacing.py runs/t3x4 --seed 4 --steps 10 --grids quadratic,cubic \
        --arms h03 --refine 500:1000,150:500,0:150

`--refine LO:HI` adds, per grid, a run whose timesteps in [LO, HI) are replaced by those of the
100-step quadratic grid: DDIM integrated finely there and coarsely elsewhere, which says how much
of the coarse grid's error comes from that range of t.

Grids: `uniform` and `quadratic` are dgan's `diffusion.timestep_spacing` options; `trailing`
(evenly spaced, ending at T/steps - 1), `logsnr` (evenly spaced in log-SNR) and `edm` (Karras et
al. 2022, rho = 7 in sigma) are the usual alternatives, and `cubic` (t_k = T (k/steps)^3 - 1) the
quadratic grid pushed further towards t = 0; all built here for comparison only.
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

GRIDS = ("uniform", "quadratic", "trailing", "logsnr", "edm", "cubic")
FINE_STEPS = 100  # --refine's grid: steps about 10x shorter than DDIM 10's at every t


def nearest(table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.argmin((table - v).abs()) for v in targets]).long()


def grid(diffusion: Diffusion, kind: str, steps: int) -> torch.Tensor:
    T, abar = diffusion.num_steps, diffusion.alpha_bar.double().cpu()
    if kind in ("uniform", "quadratic"):
        diffusion.spacing = kind
        return diffusion.timesteps_for(steps)
    if kind == "cubic":
        k = torch.arange(steps, 0, -1, dtype=torch.float64)
        ts = (T * (k / steps) ** 3 - 1).round().clamp(min=0).long()
        return torch.tensor(sorted(set(ts.tolist()), reverse=True))  # distinct: a merged pair is one step
    if kind == "trailing":
        return (torch.arange(T, 0, -T / steps, dtype=torch.float64) - 1).round().long()
    if kind == "logsnr":
        lam = torch.log(abar / (1 - abar))
        return nearest(lam, torch.linspace(float(lam[T - 1]), float(lam[0]), steps, dtype=torch.float64))
    sigma = ((1 - abar) / abar).sqrt()  # edm
    lo, hi, rho = float(sigma[0]) ** (1 / 7), float(sigma[T - 1]) ** (1 / 7), 7.0
    return nearest(sigma, (hi + torch.linspace(0, 1, steps, dtype=torch.float64) * (lo - hi)) ** rho)


def refined(diffusion: Diffusion, ts: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """ts with its timesteps in [lo, hi) replaced by the FINE_STEPS quadratic grid's."""
    fine = Diffusion(diffusion.num_steps, spacing="quadratic").timesteps_for(FINE_STEPS).tolist()
    kept = [t for t in ts.tolist() if not lo <= t < hi] + [t for t in fine if lo <= t < hi]
    return torch.tensor(sorted(set(kept), reverse=True))


def runs(diffusion: Diffusion, kind: str, steps: int, refine: list[tuple[int, int]]):
    """(label, timesteps) for the grid, then for each --refine range of it."""
    ts = grid(diffusion, kind, steps)
    yield kind, ts
    for lo, hi in refine:
        yield f"{kind}, fine in [{lo}, {hi})", refined(diffusion, ts, lo, hi)


def score_grid(G: torch.nn.Module, diffusion: Diffusion, ts: torch.Tensor, args: argparse.Namespace,
               seed: int, data: dict) -> dict:
    """FID/KID of args.samples DDIM samples on exactly the timesteps ts."""
    diffusion.timesteps_for = lambda n: ts  # this instance samples on this grid
    x = generate_indices(G, diffusion, range(args.samples), sampler="ddim", steps=len(ts), seed=seed,
                         channels=1, image_size=32, num_classes=0, batch_size=500, device=torch.device("cpu"))
    return fid_kid(data["ref_images"], to_uint8(x), extractor_path=args.out / "extractor.pt", batch_size=256)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--arms", default="hybrid,diffusion")
    p.add_argument("--steps", default="10,50")
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="the folder's quality.py --seed: its sampling noise")
    p.add_argument("--refine", default="", help="LO:HI,... ranges of t to integrate on the fine grid")
    p.add_argument("--arm", action="append", default=[],
                   help="an arm's definition, as quality.py takes it (optional: ARM.pt records it)")
    args = p.parse_args(argv)
    refine = [tuple(map(int, r.split(":"))) for r in args.refine.split(",") if r]
    data = torch.load(args.out / "data.pt", weights_only=True)
    defined = [x for spec in args.arm for x in ("--arm", spec)]  # optional: ARM.pt records its overrides
    qargs = quality.parse_args(["--phase", "sample", "--out", str(args.out), "--seed", str(args.seed),
                                "--arms", args.arms, *defined])
    print("| arm | steps | grid | timesteps | FID | KID |\n|---|---:|---|---|---:|---:|")
    for arm in args.arms.split(","):
        record = torch.load(args.out / f"{arm}.pt", weights_only=True)
        cfg = quality.run_config(qargs, quality.trained_overrides(qargs, arm, record))
        G, _ = build_models(cfg, torch.device("cpu"))
        G.load_state_dict(record["ema"])
        for steps in map(int, args.steps.split(",")):
            for label, ts in (r for kind in args.grids.split(",")
                              for r in runs(Diffusion.from_config(cfg.diffusion), kind, steps, refine)):
                clock = time.perf_counter()
                s = score_grid(G, Diffusion.from_config(cfg.diffusion), ts, args, qargs.seed, data)
                shown = ts.tolist() if len(ts) <= 10 else f"{ts[:3].tolist()}..{ts[-3:].tolist()} ({len(ts)})"
                print(f"| {arm} | {steps} | {label} | {shown} | {s['fid']:.3f} | {s['kid']:.4f} |  "
                      f"<!-- {time.perf_counter() - clock:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
