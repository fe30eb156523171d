"""Memory and time of the synthetic-data audit against a large training set (issue 12).

    python benchmarks/audit_scale.py                    # 100k training images at 28 -> 32 px
    python benchmarks/audit_scale.py --images 20000     # a quicker check

Builds a MedMNIST-style npz of N training images (PneumoniaMNIST's, each drawn again with +-8 grey
levels of noise so that no two are equal), then measures, each in a fresh process so that peaks do
not mix:
- `imports`: python, torch and dgan alone (the floor the other rows sit on);
- `whole`:   the training images read as one float32 tensor, then converted to uint8 (the old path);
- `chunked`: the same images read in chunks straight into uint8 (`load_reference_u8`, what the audit
  now uses);
- `audit`:   the chunked read, then the memorization audit and precision/recall/density/coverage of
  1000 "generated" images (jittered test images) against them, in a domain extractor's feature space.
Prints each row's peak resident memory (VmHWM) and wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODES = ("imports", "whole", "chunked", "audit")


def make_npz(src: Path, out: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with np.load(src) as d:
        base, labels = d["train_images"], d["train_labels"]
        val_images, val_labels, test_images = d["val_images"], d["val_labels"], d["test_images"]
    pick = rng.integers(0, len(base), n)
    noise = rng.integers(-8, 9, (n, *base.shape[1:]))
    images = np.clip(base[pick].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    np.savez(out, train_images=images, train_labels=labels[pick], val_images=val_images, val_labels=val_labels,
             test_images=test_images, test_labels=np.zeros((len(test_images), 1), np.int64))


def child(mode: str, npz: Path, extractor: Path) -> dict:
    # Imported here, in the measured process, so that its peak counts its own imports: the `imports`
    # row is this function with no work after them.
    import torch

    from dgan.audit import audit_scores
    from dgan.config import load_config
    from dgan.pixels import to_uint8
    from dgan.reference import load_reference, load_reference_u8

    cfg = load_config(REPO / "configs" / "pneumonia32.yaml", [f"data.path={npz}", "model.num_classes=2"])
    clock, out = time.perf_counter(), {}
    if mode == "whole":
        images, _ = load_reference(cfg, "train")
        out["images"] = int(to_uint8(images).shape[0])
    elif mode in ("chunked", "audit"):
        train, train_labels = load_reference_u8(cfg, "train")
        out["images"] = int(train.shape[0])
    if mode == "audit":
        real, real_labels = load_reference_u8(cfg, "val")
        with np.load(npz) as d:
            test = torch.from_numpy(d["test_images"][:1000]).float()
        fake = to_uint8(torch.nn.functional.interpolate(test[:, None] / 127.5 - 1, size=32, mode="bilinear"))
        scores, _ = audit_scores({"memorization", "prdc"}, cfg, fake, real, real_labels, train, train_labels,
                                 extractor_path=extractor, device=torch.device("cpu"), seed=0, utility_per_class=0)
        out.update({k: round(v, 4) for k, v in scores.items() if k in ("memorization_rate", "precision", "coverage")})
    out["seconds"] = round(time.perf_counter() - clock, 1)
    out["peak_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> int:
    """This process's peak resident memory since its exec (VmHWM). Not ru_maxrss: on Linux that
    carries over the parent's peak through fork and exec, so every child would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def build_extractor(npz: Path, out: Path) -> None:
    import torch

    from dgan.metrics import to_uint8, train_domain_extractor

    with np.load(npz) as d:
        x = torch.from_numpy(d["val_images"]).float()[:, None] / 127.5 - 1
        y = torch.from_numpy(d["val_labels"][:, 0]).long()
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear")
    train_domain_extractor(to_uint8(x), y, out, epochs=4, seed=0, device="cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "pneumoniamnist.npz")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--extractor", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.extractor)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data, extractor = Path(tmp) / "big.npz", Path(tmp) / "extractor.pt"
        make_npz(args.npz, data, args.images)
        build_extractor(data, extractor)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.images} training images, 28 -> 32 px")
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--extractor", str(extractor)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            print(f"{mode:8s} {proc.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
