"""The samplers' floor (diffusion.sample_t_min) on trained arms: the same weights and noise sampled with
the grid down to t = 0 and with no evaluation below the floor, side by side, in one run. The samples
are kept beside quality.py's, as samples-ARM-ddimSTEPS-tminT.pt (for t_min 0, quality.py's own
samples-ARM-ddimSTEPS.pt is read when it holds them all), and reused, so a second run, or one with
more --samples, draws only what is missing.

    python benchmarks/sample_floor.py runs/b0 --seed 0 --arms diffusion,hybrid --samples 500
    python benchmarks/sample_floor.py runs/cpu4 --seed 4 --preset cpu --arms diffusion,t3x --steps 50

The folder is a quality.py --out folder (data.pt, extractor.pt and the arms' ARM.pt); --seed and
--preset must be the ones it was made with, as for quality.py's sample phase. Per arm it prints FID
and KID against the held-out reals in that folder's domain feature space, the samples' edge energy
(mean |difference| of neighbouring pixels) relative to the reals', and the FID ratio floor / none.

Why this exists: at DDIM 50 a short run's samples came out grainier than the data (edge energy
1.05-1.10x the reals'), made in the steps below t = 9. There the deterministic update puts G's own
eps estimate back in, and G cannot yet tell it from texture (benchmarks/low_t.py; RESULTS.md, issue 10).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dgan.pixels import edge_energy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_folder  # noqa: E402  (benchmarks/ is not a package)
from quality_score import score_set  # noqa: E402


def main(argv=None) -> None:
    p = quality_folder.folder_parser(__doc__)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--t-min", type=int, default=9, help="the floor to compare with 0")
    a = p.parse_args(argv)
    args = quality_folder.folder_args(a)
    data = torch.load(a.out / "data.pt", weights_only=True)
    real = data["ref_images"]
    print(f"{a.out}, seed {a.seed}: DDIM {a.steps}, {a.samples} samples per cell, {real.shape[0]} held-out reals")
    print("| arm | FID t_min=0 | FID t_min=%d | ratio | KID 0 / %d | edge energy / reals' 0 / %d |"
          % (a.t_min, a.t_min, a.t_min))
    print("|---|---|---|---|---|---|")
    for arm in a.arms.split(","):
        cells = []
        for t_min in (0, a.t_min):
            fake = quality_folder.kept_cell(args, a.out, arm, "ddim", a.steps, a.samples, t_min, "sample_floor")
            cells.append((score_set(real, fake, a.out / "extractor.pt", 0),
                          edge_energy(fake) / edge_energy(real)))
        (s0, e0), (s1, e1) = cells
        print(f"| {arm} | {s0['fid']:.3f} | {s1['fid']:.3f} | {s1['fid'] / s0['fid']:.3f} | "
              f"{s0['kid']:.4f} / {s1['kid']:.4f} | {e0:.3f} / {e1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
