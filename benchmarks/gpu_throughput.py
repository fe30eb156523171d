"""Training throughput and peak memory on one GPU, the seed setup (configs/medical128.yaml model):
UNet++ ResNet34, 128 px, 1 channel, batch 32, full hybrid step (G + D + EMA), synthetic batch.

    python benchmarks/gpu_throughput.py                  # fp32, bf16, bf16+channels_last, bf16+compile
    python benchmarks/gpu_throughput.py --variants bf16 --batch 64

Every variant runs in this one process, after its own warm-up (compile time excluded and
reported separately), timed with CUDA events over `--steps` steps. Also reports the
hybrid / pure-diffusion step-time ratio at bf16 (issue 2's step-cost target on GPU).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dgan.config import load_config  # noqa: E402
from dgan.losses import diffusion_loss  # noqa: E402
from dgan.step import autocast_for, train_step  # noqa: E402
from dgan.trainer import build_trainables  # noqa: E402

VARIANTS = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "bf16+channels_last": ["train.precision=bf16", "model.channels_last=true"],
    "bf16+compile": ["train.precision=bf16", "model.compile=true"],
}


def timed(fn, steps: int) -> float:
    """Seconds per call, CUDA-event timed (the host queue is drained once per measurement)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(steps):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def run_variant(name: str, batch: int, steps: int, warmup: int) -> dict:
    cfg = load_config("configs/medical128.yaml", VARIANTS[name] + [f"train.batch_size={batch}", "train.device=cuda"])
    dev = torch.device("cuda")
    torch.manual_seed(0)
    tr, ema, _ = build_trainables(cfg, dev)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    x0 = (torch.rand(batch, 1, 128, 128, device=dev) * 2 - 1).contiguous(memory_format=fmt)
    y = torch.zeros(batch, dtype=torch.long, device=dev)

    def hybrid(i):
        train_step(tr, cfg, [(x0, y)], step=i)
        ema.update(tr.G_raw, images_seen=(i + 1) * batch, batch_images=batch)

    def pure(i):
        tr.opt_g.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (batch,), device=dev)
        eps = torch.randn_like(x0)
        with autocast_for(cfg.train.precision, dev):
            out = tr.G(tr.diffusion.q_sample(x0, t, eps), t)
        diffusion_loss(out.float(), tr.diffusion.training_target(x0, t, eps)).backward()
        torch.nn.utils.clip_grad_norm_(tr.G_raw.parameters(), 1.0, foreach=True)
        tr.opt_g.step()

    t0 = time.perf_counter()
    for i in range(warmup):
        hybrid(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    sec = timed(hybrid, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    pure(0)
    sec_pure = timed(pure, steps)
    return {"variant": name, "img_s": batch / sec, "ms_step": sec * 1e3, "peak_gib": peak,
            "warmup_s": warm_s, "ratio_vs_diffusion": sec / sec_pure}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, 128 px, UNet++ ResNet34")
    print("| variant | img/s | ms/step | peak GiB | warm-up s | hybrid/diffusion |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.variants:
        r = run_variant(name, args.batch, args.steps, args.warmup)
        print(f"| {r['variant']} | {r['img_s']:.0f} | {r['ms_step']:.1f} | {r['peak_gib']:.2f} | "
              f"{r['warmup_s']:.1f} | {r['ratio_vs_diffusion']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
