"""Helpers for the data tests: index-coded shards, input trees, and the torchrun worker.

Run as a script under torchrun it is the DDP worker of tests/test_data_ddp.py.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from dgan.config import DataConfig  # importing dgan also sets the offline environment (dgan/__init__.py)

INDEX_PX = 8


def index_image(index: int, size_px: int = INDEX_PX) -> np.ndarray:
    """A uint8 image whose first two pixels spell `index` (so a batch tells which samples it holds)."""
    img = ((np.arange(size_px * size_px) * 7 + index * 13) % 251).astype(np.uint8).reshape(size_px, size_px)
    img[0, 0], img[0, 1] = index % 256, index // 256
    return img


def indices_of(x) -> list[int]:
    """Inverse of index_image for a batch x in [-1, 1] of shape [B, 1, H, W]."""
    px = np.rint((x[:, 0, 0, :2].numpy() + 1.0) / 2.0 * 255.0).astype(int)
    return [int(a + 256 * b) for a, b in px]


def write_index_shards(folder: Path, sizes: list[int], *, split: str = "train", start: int = 0) -> list[Path]:
    """Real tar shards of index-coded 8x8 PNGs (label = index % 2), sizes as given, plus a manifest."""
    import webdataset as wds

    from dgan.data.shards import FORMAT, FORMAT_VERSION, MANIFEST_NAME, encode_png

    folder.mkdir(parents=True, exist_ok=True)
    shards, index = [], start
    for shard_no, size in enumerate(sizes):
        path = folder / f"{split}-{shard_no:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for _ in range(size):
                sink.write({"__key__": f"s{index:06d}", "png": encode_png(index_image(index)),
                            "cls": str(index % 2).encode()})
                index += 1
        shards.append({"name": path.name, "count": size, "bytes": path.stat().st_size})
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "hash": f"test-{start}-{sizes}",
                "resolution": INDEX_PX, "channels": 1, "classes": ["even", "odd"],
                "splits": {split: {"count": sum(sizes), "shards": shards}}, "source": {"kind": "test"},
                "skipped": {}, "skipped_files": []}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return [folder / s["name"] for s in shards]


def data_cfg(**kw) -> DataConfig:
    """A DataConfig for loader tests: shard source, 64 phantoms, a small shuffle buffer, then `kw`."""
    return DataConfig(**{"source": "shards", "num_images": 64, "cache_dir": "unused", "shuffle_buffer": 16, **kw})


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under root: proof that an input was not modified."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def batches_as_indices(data, epoch: int, start: int = 0) -> list[list[int]]:
    return [indices_of(x) for x, _ in data.epoch(epoch, start)]


# ----------------------------------------------------------------------------------------
# torchrun worker for tests/test_data_ddp.py


def ddp_main(pattern: str, out_dir: str, num_workers: int, batch_size: int) -> None:
    import torch
    import torch.distributed as dist

    from dgan.data import build_train_data

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for mode in ("finite", "resampled"):
        cfg = data_cfg(shards=pattern, num_workers=num_workers, resampled=mode == "resampled")
        data = build_train_data(cfg, image_size=INDEX_PX, channels=1, batch_size=batch_size, seed=7,
                                rank=rank, world_size=world)
        epochs = []
        for epoch in range(2):
            seen = []
            for x, y in data.epoch(epoch):
                # a collective per batch, like DDP's gradient all-reduce: unequal counts would hang here
                dist.all_reduce(torch.ones(1))
                seen.append(indices_of(x))
                assert x.shape == (batch_size, 1, INDEX_PX, INDEX_PX) and y.dtype == torch.int64
                assert y.tolist() == [i % 2 for i in seen[-1]], "labels do not match their images"
            epochs.append(seen)
        resumed = batches_as_indices(data, 1, 3) if mode == "finite" else [len(list(data.epoch(1, 3)))]
        result[mode] = {"epochs": epochs, "batches_per_epoch": data.batches_per_epoch, "mode": data.plan.mode,
                        "resumed": resumed}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def count_duplicates(values: list[int]) -> int:
    return sum(n - 1 for n in Counter(values).values() if n > 1)


if __name__ == "__main__":
    ddp_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
