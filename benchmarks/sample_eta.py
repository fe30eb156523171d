"""DDIM's stochasticity (eta) on trained arms: the same weights and initial noise sampled with eta 0 and with
each --etas value, side by side, in one run.

    python benchmarks/sample_eta.py runs/b0 --seed 0 --arms diffusion,hybrid --etas 0.3,1.0 --samples 1000
    python benchmarks/sample_eta.py runs/b0 --seed 0 --arms diffusion,hybrid --samples 1000 --t-min 9

The folder is a quality.py --out folder (data.pt, extractor.pt and the arms' ARM.pt); --seed and --preset
must be the ones it was made with. Per arm it prints FID (and KID) against the held-out reals in that
folder's domain feature space for eta 0 and each eta. The eta-0 column is quality.py's own
samples-ARM-ddimSTEPS.pt (with --t-min, sample_floor.py's samples-ARM-ddimSTEPS-tminT.pt) when it holds
--samples images (only read), else drawn here from the same noise. The eta > 0 cells are not kept: their fresh noise comes from one generator per arm and eta,
seeded 1000 + --seed and drawn in batches of 250, so a rerun draws the same images.

Why this exists: eta = 1 samples x_{t-1} from the diffusion posterior given G's x0 estimate, where eta = 0
puts G's own eps estimate back in. A G whose x0 estimates are pushed towards sharp, sample-like images
(the adversarial term) should suit the first better; RESULTS.md (issue 10) has what was measured.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/ is not a package)
import quality_folder  # noqa: E402
from quality_score import score_set  # noqa: E402

from dgan.generation import guided_model_fn, initial_noise  # noqa: E402

BATCH = 250


def eta_cell(args, out: Path, arm: str, steps: int, n: int, eta: float, t_min: int) -> torch.Tensor:
    """n uint8 DDIM samples of one arm with this eta and floor; sample i starts from quality.py's noise for i."""
    G, diffusion, cfg = quality.load_arm(args, out, arm, (f"diffusion.sample_t_min={t_min}",))
    device = torch.device(cfg.train.device)
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    gen = torch.Generator(device=device).manual_seed(1000 + args.seed)
    parts = []
    with torch.no_grad():
        for start in range(0, n, BATCH):
            x_T = initial_noise(range(start, min(n, start + BATCH)), args.seed, shape).to(device)
            x = diffusion.ddim_sample(guided_model_fn(G, None, 1.0), x_T=x_T, steps=steps, eta=eta, generator=gen)
            parts.append(quality.to_uint8(x.cpu()))
    return torch.cat(parts)


def stock_cell(args, out: Path, arm: str, steps: int, n: int, t_min: int) -> torch.Tensor:
    """eta 0: quality.py's (or for a floor sample_floor.py's) samples file when it holds n images that
    this arm and seed draw (quality.samples_to_keep checks one; the file is only read), else drawn here."""
    path = out / f"samples-{arm}-ddim{steps}{f'-tmin{t_min}' if t_min else ''}.pt"
    kept = quality.samples_to_keep(args, out, arm, "ddim", steps, path, n, (f"diffusion.sample_t_min={t_min}",))
    return kept if kept is not None and kept.shape[0] == n else eta_cell(args, out, arm, steps, n, 0.0, t_min)


def main(argv=None) -> None:
    p = quality_folder.folder_parser(__doc__)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--etas", default="1.0", help="comma-separated etas in (0, 1] to compare with 0")
    p.add_argument("--t-min", type=int, default=0, help="the samplers' floor (diffusion.sample_t_min) in every cell")
    a = p.parse_args(argv)
    etas = [float(e) for e in a.etas.split(",")]
    if not all(0.0 < e <= 1.0 for e in etas):
        raise SystemExit(f"--etas {a.etas}: each must be in (0, 1]; eta 0 is always the first column")
    args = quality_folder.folder_args(a)
    real = torch.load(a.out / "data.pt", weights_only=True)["ref_images"]
    print(f"{a.out}, seed {a.seed}: DDIM {a.steps}, t_min {a.t_min}, {a.samples} samples per cell, "
          f"{real.shape[0]} held-out reals")
    print("| arm | FID eta 0 | " + " | ".join(f"FID eta {e:g}" for e in etas) + " | KID eta 0 / "
          + " / ".join(f"{e:g}" for e in etas) + " |")
    print("|---|" + "---|" * (len(etas) + 2))
    extractor = a.out / "extractor.pt"
    for arm in a.arms.split(","):
        scores = [score_set(real, stock_cell(args, a.out, arm, a.steps, a.samples, a.t_min), extractor, 0)]
        for eta in etas:
            clock = time.perf_counter()
            cell = eta_cell(args, a.out, arm, a.steps, a.samples, eta, a.t_min)
            scores.append(score_set(real, cell, extractor, 0))
            print(f"  {arm} eta {eta:g}: {time.perf_counter() - clock:.0f} s", file=sys.stderr, flush=True)
        print(f"| {arm} | " + " | ".join(f"{s['fid']:.3f}" for s in scores) + " | "
              + " / ".join(f"{s['kid']:.4f}" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
