"""Cost of one full hybrid training step relative to a pure-diffusion step, same generator.

    python benchmarks/step_cost.py                      # UNet++ ResNet34, 64 px, batch 8 (the seed setup)
    python benchmarks/step_cost.py --preset quickstart  # the CPU quick-start model
    python benchmarks/step_cost.py --preset pneumonia32-narrow --preset pneumonia32  # and their step times
    python benchmarks/step_cost.py --preset pneumonia32 --set gan.self_fake_every=2  # one setting changed

Both step kinds are measured in ONE process, interleaved round by round, so that machine
load affects them alike; the ratio of medians is what we report. The pure-diffusion step is
exactly what a plain DDPM trainer does: one G forward, MSE, backward, clip, Adam, at the same
train.precision as the hybrid (so `--set train.precision=bf16` compares bf16 with bf16).
Target (issue 2): hybrid / diffusion <= 1.15. The seed code ran G three times: 1.61x.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dgan.config import load_config  # noqa: E402
from dgan.losses import diffusion_loss  # noqa: E402
from dgan.step import Trainables, autocast_for, train_step  # noqa: E402
from dgan.trainer import build_trainables  # noqa: E402

# name -> (config file, overrides)
PRESETS = {
    "seed64": ("configs/default.yaml", ["model.encoder=resnet34", "model.encoder_depth=5",
                                        "model.decoder_channels=[256,128,64,32,16]", "model.image_size=64",
                                        "train.batch_size=8"]),
    "quickstart": ("configs/default.yaml", []),  # as shipped
    # configs/pneumonia32.yaml as shipped (its wide decoder and its gan block), and with the old
    # narrow decoder. Before 2026-12-05 these were default.yaml's gan block at pneumonia32's widths.
    "pneumonia32": ("configs/pneumonia32.yaml", []),
    "pneumonia32-narrow": ("configs/pneumonia32.yaml", ["model.decoder_channels=[64,32,16,16]"]),
}


def diffusion_step(tr: Trainables, x0: torch.Tensor, clip: float, precision: str) -> None:
    """The plain DDPM step; under fp16 through G's GradScaler (a pass-through for fp32 and bf16)."""
    tr.opt_g.zero_grad(set_to_none=True)
    t = torch.randint(0, tr.diffusion.num_steps, (x0.shape[0],))
    eps = torch.randn_like(x0)
    target = tr.diffusion.training_target(x0, t, eps)
    with autocast_for(precision, x0.device):
        out = tr.G(tr.diffusion.q_sample(x0, t, eps), t).float()
    tr.scaler_g.scale(diffusion_loss(out, target)).backward()
    tr.scaler_g.unscale_(tr.opt_g)
    torch.nn.utils.clip_grad_norm_(tr.G_raw.parameters(), clip, foreach=True)
    tr.scaler_g.step(tr.opt_g)
    tr.scaler_g.update()


def measure(preset: str, rounds: int, reps: int, extra: list[str]) -> dict:
    path, overrides = PRESETS[preset]
    cfg = load_config(path, overrides + extra + ["train.device=cpu"])
    torch.manual_seed(0)
    tr, _, _ = build_trainables(cfg, torch.device("cpu"))
    s = cfg.model.image_size
    x0 = torch.rand(cfg.train.batch_size, cfg.model.channels, s, s) * 2 - 1
    y = torch.zeros(cfg.train.batch_size, dtype=torch.long)
    hybrid = lambda i: train_step(tr, cfg, [(x0, y)], step=i)  # noqa: E731  (R1 every r1_every, as in training)
    pure = lambda i: diffusion_step(tr, x0, cfg.train.grad_clip_g, cfg.train.precision)  # noqa: E731
    for i in range(2):  # warm-up: allocator, first-call overheads
        hybrid(i), pure(i)
    times = {"hybrid": [], "diffusion": []}
    step = 0
    for _ in range(rounds):
        for name, fn in (("hybrid", hybrid), ("diffusion", pure)):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(step)
                step += 1
            times[name].append((time.perf_counter() - t0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset, "batch": cfg.train.batch_size, "px": s, "encoder": cfg.model.encoder,
            "hybrid_ms": med["hybrid"] * 1e3, "diffusion_ms": med["diffusion"] * 1e3,
            "ratio": med["hybrid"] / med["diffusion"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), action="append",
                   help="repeatable: each is measured in turn, and step times are compared with the first's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=16, help="steps per timed block (16 = one R1 period)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="repeatable: a config override for every preset, e.g. --set gan.self_fake_every=2")
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    first = None
    for preset in args.preset or ["seed64"]:
        r = measure(preset, args.rounds, args.reps, args.set)
        first = first or r
        print(f"{r['preset']}: {r['encoder']} {r['px']}px batch {r['batch']}: hybrid {r['hybrid_ms']:.0f} ms, "
              f"diffusion {r['diffusion_ms']:.0f} ms, ratio {r['ratio']:.3f} (target <= 1.15); hybrid step "
              f"{r['hybrid_ms'] / first['hybrid_ms']:.2f}x {first['preset']}'s", flush=True)


if __name__ == "__main__":
    main()
