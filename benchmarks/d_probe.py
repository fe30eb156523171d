"""Can D learn to tell G's fakes from reals at all? D alone, trained against a fixed, trained G.

    python benchmarks/d_probe.py runs/hx2 --arm diffusion                           # the shipped D settings
    python benchmarks/d_probe.py runs/hx2 --arm diffusion --set gan.r1_gamma=0.05 \
        --set train.lr_d=2e-4                                                       # the D before adv_balance

Loads G's EMA weights from a benchmarks/quality.py --out folder (its `ARM.pt` and `data.pt`), then
trains a fresh D with the trainer's own D code (`step.d_context`, `step.d_backward`: instance noise,
lazy R1, the optimizer and its betas) on that folder's training images: B reals against B/2 fakes
x0_hat from t <= gan.adv_t_max per step, with G frozen. A D that can learn drives L_D below its
chance value 2 ln 2 = 1.386; one that stays there gives G an adversarial gradient without signal.
Prints L_D and the mean real/fake logits every 25 steps.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dgan.adaptive import diffuse, sample_tau  # noqa: E402
from dgan.config import load_config  # noqa: E402
from dgan.step import d_backward, d_context  # noqa: E402
from dgan.trainer import build_trainables  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a benchmarks/quality.py --out folder")
    p.add_argument("--arm", default="diffusion", help="whose G weights (ARM.pt in the folder)")
    p.add_argument("--set", action="append", default=[], help="a config override (repeatable)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    cfg = load_config(REPO / "configs" / "pneumonia32.yaml", ["train.device=cpu", *args.set])
    tr, _, _ = build_trainables(cfg, torch.device("cpu"))
    tr.G_raw.load_state_dict(torch.load(args.out / f"{args.arm}.pt", weights_only=True)["ema"])
    tr.G_raw.eval()
    images = torch.load(args.out / "data.pt", weights_only=True)["train_images"].float() / 127.5 - 1
    g, B, k = cfg.gan, args.batch, args.batch // 2
    for step in range(args.steps):
        x0 = images[torch.randint(0, len(images), (B,))]
        t = torch.randint(0, g.adv_t_max + 1, (B,))
        x_t = tr.diffusion.q_sample(x0, t, torch.randn_like(x0))
        with torch.no_grad():
            x0_hat = tr.diffusion.model_x0(x_t[:k], t[:k], tr.G_raw(x_t[:k], t[:k])).clamp(-1, 1)
        tau = sample_tau(B, tr.ada.t_adapt, t_max=g.t_max, dist=g.tau_dist, device="cpu")
        y_real = diffuse(x0, tau, tr.diffusion.alpha_bar, g.sigma)
        y_fake = diffuse(x0_hat, tau[:k], tr.diffusion.alpha_bar, g.sigma)
        tr.opt_d.zero_grad(set_to_none=True)
        m = d_backward(tr, cfg, x0, y_real, y_fake, tau, None, d_context(tr, cfg, x0, x_t[:k], t[:k], None),
                       do_r1=g.r1_gamma > 0 and step % g.r1_every == 0, sync=True, loss_scale=1.0)
        tr.opt_d.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: L_D {float(m['L_D']):.3f} D_real {float(m['D_real']):+.3f} "
                  f"D_fake {float(m['D_fake']):+.3f}", flush=True)


if __name__ == "__main__":
    main()
