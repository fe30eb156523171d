"""Training-loader throughput: dgan's webdataset pipeline vs an ImageFolder + DataLoader baseline.

Both read the same 128 px grayscale PNGs (phantoms, two classes), apply equivalent training
augmentation (crop, flips, small affine, brightness/contrast/gamma jitter, each with the
same probability) and produce float batches in [-1, 1] with labels.

Reported per pipeline: wall-clock images/s and images per CPU-second ("per core": CPU time
of the main process and its DataLoader workers, so the figure is fair on a shared or busy
machine). Targets from the issue: >= 1000 images/s per core, and >= 1.0x the baseline.

    python benchmarks/loader_throughput.py                      # 128 px, augmentation on, 0 workers
    python benchmarks/loader_throughput.py --workers 2 --images 4096
    python benchmarks/loader_throughput.py --size 32 --no-augment   # the quick-start setting
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dgan.config import DataConfig  # noqa: E402


@dataclass
class Result:
    name: str
    images: int
    wall_s: float
    cpu_s: float

    @property
    def per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def per_core_s(self) -> float:
        return self.images / self.cpu_s


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(name: str, epochs: Callable[[int], Iterable], num_epochs: int) -> Result:
    """Time `num_epochs` epochs after one warm-up epoch (imports, first-touch page cache)."""
    for _ in epochs(0):
        pass
    images, wall, cpu = 0, time.perf_counter(), cpu_seconds()
    for epoch in range(1, num_epochs + 1):
        for x, y in epochs(epoch):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            images += x.shape[0]
    return Result(name, images, time.perf_counter() - wall, cpu_seconds() - cpu)


def write_inputs(root: Path, num_images: int, size_px: int) -> Path:
    """An ImageFolder tree of grayscale phantom PNGs (class folder = lesion label)."""
    import cv2

    from dgan.data.synthetic import make_phantoms

    images, labels = make_phantoms(num_images, size_px, seed=11)
    folder = root / "images"
    for label in (0, 1):
        (folder / f"class{label}").mkdir(parents=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        cv2.imwrite(str(folder / f"class{label}" / f"{i:06d}.png"), img)
    return folder


def dgan_pipeline(root: Path, folder: Path, args: argparse.Namespace) -> Callable[[int], Iterable]:
    from dgan.data import build_train_data
    from dgan.data.shards import main as shards_main

    out = root / "shards"
    assert shards_main(["--input", str(folder), "--output", str(out), "--resolution", str(args.size),
                        "--no-progress", "--maxcount", "512"]) == 0
    cfg = DataConfig(source="shards", shards=str(out / "train-*.tar"), num_workers=args.workers,
                     augment=not args.no_augment, shuffle_buffer=1000)
    data = build_train_data(cfg, image_size=args.size, channels=1, batch_size=args.batch, seed=0,
                            rank=0, world_size=1)
    return data.epoch


def baseline_pipeline(folder: Path, args: argparse.Namespace) -> Callable[[int], Iterable]:
    """torchvision ImageFolder + DataLoader with the same augmentation, probabilities from DataConfig."""
    from PIL import Image
    from torchvision import datasets
    from torchvision.transforms import v2

    cfg, size = DataConfig(), args.size
    steps = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    if not args.no_augment:
        steps += [
            v2.RandomApply([v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1))], p=cfg.crop_p),
            v2.RandomHorizontalFlip(cfg.hflip_p), v2.RandomVerticalFlip(cfg.vflip_p),
            v2.RandomApply([v2.RandomAffine(degrees=7, translate=(0.04, 0.04), scale=(0.95, 1.05))], p=cfg.affine_p),
            v2.RandomApply([v2.ColorJitter(brightness=0.08, contrast=0.1)], p=cfg.intensity_p),
            v2.RandomApply([v2.Lambda(lambda t: v2.functional.adjust_gamma(t, float(np.random.uniform(0.9, 1.1))))],
                           p=cfg.intensity_p),
        ]
    steps.append(v2.Normalize([0.5], [0.5]))  # [0, 1] -> [-1, 1]
    dataset = datasets.ImageFolder(str(folder), transform=v2.Compose(steps),
                                   loader=lambda path: Image.open(path).convert("L"))

    def epoch(_: int):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                           num_workers=args.workers)

    return epoch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for both pipelines")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenCV threads (1: a per-core measure)")
    p.add_argument("--no-augment", action="store_true")
    args = p.parse_args()
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = write_inputs(root, args.images, args.size)
        results = [measure("dgan webdataset", dgan_pipeline(root, folder, args), args.epochs),
                   measure("ImageFolder baseline", baseline_pipeline(folder, args), args.epochs)]
    print(f"{args.images} images, {args.size}px gray, batch {args.batch}, workers {args.workers}, "
          f"augment {'off' if args.no_augment else 'on'}, threads {args.threads}, {os.cpu_count()} CPUs")
    print(f"{'pipeline':24s} {'img/s':>9s} {'img/CPU-s':>10s}")
    for r in results:
        print(f"{r.name:24s} {r.per_s:9.0f} {r.per_core_s:10.0f}")
    ours, base = results
    print(f"speed-up vs baseline: {ours.per_s / base.per_s:.2f}x wall, {ours.per_core_s / base.per_core_s:.2f}x per core")
    ok = ours.per_core_s >= 1000 and ours.per_core_s >= base.per_core_s
    print("targets (>= 1000 img/s per core, >= 1.0x baseline):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
