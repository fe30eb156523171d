"""How well trained arms denoise at small t, against a linear filter fitted to the data.

    python benchmarks/low_t.py runs/b3 --seed 3 --arms diffusion,hybrid
    python benchmarks/low_t.py runs/t3x4 --seed 4 --preset cpu --arms diffusion,t3x --t 0,5,9

The folder is a quality.py --out folder (data.pt and the arms' ARM.pt); --seed and --preset must be
the ones it was made with. For each t it noises --images held-out reals (the same noisy images in
every column) and prints the RMSE of each x0 estimate relative to the noisy input's own (x_t / sqrt(abar_t)):
1 removes nothing, 0 is perfect.

The yardstick is the best linear denoiser of its size: a 7x7 filter plus a bias, fitted by least
squares to noisy copies of --fit-images training images at that t. Why: the DDIM-50 samples of
short runs are grainier than the data, made in the steps below t = 9 (benchmarks/RESULTS.md, issue
10); an arm that stayed worse than a linear filter there after long training would point at a defect
in G's full-resolution path rather than at too little training (measured: worse after 28 kimg,
better after 105.6).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/ is not a package)
import quality_folder  # noqa: E402

FILTER_PX = 7


def patches(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] -> [N*H*W, FILTER_PX**2 + 1]: each pixel's neighbourhood (reflected at the edges)
    and a 1 for the bias."""
    half = FILTER_PX // 2
    cols = F.unfold(F.pad(x, (half,) * 4, mode="reflect"), FILTER_PX).transpose(1, 2).reshape(-1, FILTER_PX**2)
    return torch.cat([cols, torch.ones(cols.shape[0], 1)], dim=1)


def fit_linear_denoiser(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """Least-squares filter weights from noisy to clean pixels (normal equations in float64: P^T P summed
    over half a million rows in float32 loses the digits the solve needs)."""
    P, y = patches(noisy).double(), clean.reshape(-1, 1).double()
    return torch.linalg.solve(P.T @ P, P.T @ y).float()


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def main(argv=None) -> None:
    p = quality_folder.folder_parser(__doc__)
    p.add_argument("--images", type=int, default=256, help="held-out reals noised per t")
    p.add_argument("--fit-images", type=int, default=512, help="training images the linear filter is fitted to")
    p.add_argument("--t", default="0,1,3,5,9,19,39", help="comma-separated timesteps")
    a = p.parse_args(argv)
    args = quality_folder.folder_args(a)
    data = torch.load(a.out / "data.pt", weights_only=True)
    train = data["train_images"][: a.fit_images].float() / 127.5 - 1
    held_out = data["ref_images"][: a.images].float() / 127.5 - 1
    arms = {arm: quality.load_arm(args, a.out, arm)[:2] for arm in a.arms.split(",")}
    diffusion = next(iter(arms.values()))[1]
    if any(not torch.equal(d.alpha_bar.cpu(), diffusion.alpha_bar.cpu()) for _, d in arms.values()):
        raise SystemExit("the arms have different noise schedules: compare them in separate runs")
    gen = torch.Generator().manual_seed(a.seed)
    print(f"{a.out}, seed {a.seed}: x0 RMSE / the noisy input's, {held_out.shape[0]} held-out reals")
    print(f"| t | noisy input RMSE | linear {FILTER_PX}x{FILTER_PX} | " + " | ".join(arms) + " |")
    print("|---" * (3 + len(arms)) + "|")
    for t in [int(v) for v in a.t.split(",")]:
        abar = diffusion.abar_at(t)
        weights = fit_linear_denoiser(train, diffusion.q_sample(train, torch.tensor(t),
                                                                torch.randn(train.shape, generator=gen)))
        x_t = diffusion.q_sample(held_out, torch.tensor(t), torch.randn(held_out.shape, generator=gen))
        base = rmse(x_t / abar**0.5, held_out)
        # both clamped to the data's range, as the samplers clamp G's x0
        linear = (patches(x_t) @ weights).reshape(held_out.shape).clamp(-1, 1)
        cells = [rmse(linear, held_out) / base]
        tt = torch.full((held_out.shape[0],), t, device=args.device)
        for G, arm_diffusion in arms.values():
            with torch.no_grad():
                x0 = arm_diffusion.model_x0(x_t.to(args.device), tt, G(x_t.to(args.device), tt)).cpu()
            cells.append(rmse(x0.clamp(-1, 1), held_out) / base)
        print(f"| {t} | {base:.4f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
