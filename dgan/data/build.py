"""Building a run's data: the training stream (`build_train_data`) from shards, or from a built-in
source cached as shards once (phantoms, an npz); and the held-out images an evaluation scores
against (`build_eval_images`). Every check happens here, before any model is built.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from dgan.data import shards as shard_io
from dgan.data.shard_sets import ShardSet, cached_shards, resolve_shards
from dgan.data.loader import (BadSample, LoaderPlan, SkipLog, TrainData, assign_shards, check_shard_counts, collate,
                              decode_sample)
from dgan.data.sources import DataError, letterbox_resize, read_npz, to_stored
from dgan.data.synthetic import PHANTOM_VERSION, eval_phantom_seed, make_phantoms
from dgan.data.transforms import AugmentSettings, build_train_transform

log = logging.getLogger("dgan.data")


CACHE_SHARD_SAMPLES = 256     # built-in caches: several shards, so shard mode works for a few ranks



def build_train_data(cfg: Any, *, image_size: int, channels: int, batch_size: int, seed: int,
                     rank: int, world_size: int) -> TrainData:
    """The rank's TrainData for DataConfig `cfg`; all checks happen here, before any model is built."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    shard_set = train_shards(cfg, image_size=image_size, channels=channels)
    return make_train_data(shard_set, cfg, image_size=image_size, channels=channels, batch_size=batch_size,
                           seed=seed, rank=rank, world_size=world_size)



def make_train_data(shard_set: ShardSet, cfg: Any, *, image_size: int, channels: int, batch_size: int,
                    seed: int, rank: int, world_size: int) -> TrainData:
    total = shard_set.total
    per_step = batch_size * world_size
    batches = total // per_step
    if batches < 1:
        raise DataError(f"{shard_set.urls[0]}: {total} images, fewer than one step needs "
                        f"(batch_size {batch_size} x world_size {world_size} = {per_step}); lower train.batch_size")
    workers = int(cfg.num_workers)
    if workers > batches:
        log.info("data: %d workers but %d batches per epoch; using %d workers", workers, batches, batches)
        workers = batches  # a worker with no batch to make would only read shards for nothing
    resolution = shard_set.manifest.get("resolution")
    if resolution not in (None, image_size):
        log.info("data: shards are %spx, the model wants %dpx; resizing on the fly", resolution, image_size)
    plan = LoaderPlan(shard_set.urls, shard_set.counts, batch_size, rank, world_size, workers, batches,
                      "resampled" if cfg.resampled else "shard", seed,
                      int(cfg.shuffle_buffer), image_size, channels,
                      AugmentSettings.from_config(cfg, image_size))
    if plan.mode == "shard" and assign_shards(plan, 0) is None:
        plan = replace(plan, mode="sample")
    # Build the augmentation once here: a bad setting fails before training, and the
    # albumentations import is paid once instead of in every freshly forked worker.
    build_train_transform(plan.augment)
    return TrainData(plan, shard_set.manifest)



def train_shards(cfg: Any, *, image_size: int, channels: int) -> ShardSet:
    source = cfg.source
    if source == "shards":
        if not cfg.shards:
            raise DataError("data.shards is not set; point it at train shards, e.g. data.shards='shards/train-*.tar'")
        return resolve_shards(cfg.shards, "data.shards")
    if source == "phantoms":
        folder = phantom_cache(cfg, image_size=image_size, channels=channels)
    elif source == "npz":
        folder = npz_cache(cfg, image_size=image_size, channels=channels)
    else:
        raise DataError(f"data.source {source!r}: use phantoms, npz or shards")
    shard_set = resolve_shards(str(folder / "train-*.tar"), f"data cache {folder}")
    if shard_set.total != shard_set.manifest["splits"]["train"]["count"]:
        raise DataError(f"data cache {folder} is incomplete (shards were removed); delete that folder to rebuild it")
    return shard_set



def phantom_cache(cfg: Any, *, image_size: int, channels: int) -> Path:
    key = {"source": "phantoms", "num_images": int(cfg.num_images), "seed": int(cfg.phantom_seed),
           "resolution": image_size, "channels": channels, "format": shard_io.FORMAT_VERSION,
           "phantoms": PHANTOM_VERSION}

    def build(out_dir: Path) -> None:
        images, labels = make_phantoms(key["num_images"], image_size, key["seed"])
        shard_io.write_shards({"train": shard_io.array_records(images, labels, "phantoms")}, out_dir,
                              resolution=image_size, channels=channels, classes=["no_lesion", "lesion"],
                              source=key, maxcount=CACHE_SHARD_SAMPLES, progress=False)

    return cached_shards(Path(cfg.cache_dir), "phantoms", key, build)



def npz_cache(cfg: Any, *, image_size: int, channels: int) -> Path:
    if not cfg.path:
        raise DataError("data.source=npz needs data.path=/path/to/file.npz")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist; set data.path to a MedMNIST-style .npz")
    key = {"source": "npz", "sha256": shard_io.file_sha256(path), "split": cfg.split, "resolution": image_size,
           "channels": channels, "format": shard_io.FORMAT_VERSION}

    def build(out_dir: Path) -> None:
        images, labels = read_npz(path, cfg.split)
        # a seeded write order mixes classes across shards, whatever order the file has
        order = np.random.default_rng(0).permutation(len(images))
        records = shard_io.array_records(images, labels, f"{path.name}:{cfg.split}", order)
        shard_io.write_shards({"train": records}, out_dir, resolution=image_size, channels=channels,
                              classes=[str(c) for c in np.unique(labels)], maxcount=CACHE_SHARD_SAMPLES,
                              source={**key, "input": str(path.resolve())}, progress=False)

    return cached_shards(Path(cfg.cache_dir), "npz", key, build)



EVAL_CHUNK = 1024  # images converted at a time: the float32 peak of a held-out read, whatever N is


def build_eval_images(cfg: Any, *, image_size: int, channels: int, split: str = "val",
                      max_images: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Held-out images (float32 [-1, 1], N x C x H x W) and int64 labels, no augmentation: all of
    `iter_eval_images`'s chunks at once. A large set read only to be kept as uint8 (the audit's
    training images) should use the chunks instead, which never hold the whole set as float32."""
    xs, ys = zip(*iter_eval_images(cfg, image_size=image_size, channels=channels, split=split,
                                   max_images=max_images))
    return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))


def iter_eval_images(cfg: Any, *, image_size: int, channels: int, split: str = "val",
                     max_images: Optional[int] = None, chunk: Optional[int] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Held-out images in chunks of at most `chunk` (float32 [-1, 1], N x C x H x W; int64 labels).

    - phantoms: split="val"/"test" give phantoms from a fresh seed (never the training ones),
      split="train" the training phantoms; N = max_images or data.num_images.
    - npz: that split of the npz ("val", "test" or "train"), preprocessed exactly like the
      training cache. PneumoniaMNIST's val has another label mix than train (74% vs 90%
      pneumonia): for quality numbers prefer split="train" or class-conditional scores.
    - shards: split="val" reads data.val_shards, split="train" data.shards, in file order.
    Corrupt samples are skipped and logged, never silently. Yields at least one chunk.
    """
    source, chunk = cfg.source, chunk or EVAL_CHUNK
    if source == "shards":
        yield from _eval_from_shards(cfg, image_size=image_size, channels=channels, split=split,
                                     max_images=max_images, chunk=chunk)
        return
    if source == "phantoms":
        seed = int(cfg.phantom_seed) if split == "train" else eval_phantom_seed(int(cfg.phantom_seed))
        images, labels = make_phantoms(max_images or int(cfg.num_images), image_size, seed)
    elif source == "npz":
        images, labels = read_npz(Path(cfg.path), split)  # the file's own dtype: its smallest form in memory
        images, labels = images[:max_images], labels[:max_images]
    else:
        raise DataError(f"data.source {source!r}: use phantoms, npz or shards")
    if len(images) == 0:
        raise DataError(f"data.source={source}: the {split!r} split has no images")
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        stored = [letterbox_resize(to_stored(img, channels), image_size) for img in part]
        floats = [(s.astype(np.float32) / (65535.0 if s.dtype == np.uint16 else 255.0)) for s in stored]
        yield collate([f[:, :, None] if f.ndim == 2 else f for f in floats],
                      [int(v) for v in labels[start:start + chunk]])


def _eval_from_shards(cfg: Any, *, image_size: int, channels: int, split: str, max_images: Optional[int],
                      chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
    import webdataset as wds

    pattern = {"val": cfg.val_shards, "train": cfg.shards}.get(split)
    if not pattern:
        raise DataError(f"no shards for eval split {split!r}: set data.val_shards='shards/val-*.tar' "
                        "(written by python -m dgan.data.shards --val-fraction 0.1)")
    shard_set = resolve_shards(pattern, "data.val_shards" if split == "val" else "data.shards")
    skips = SkipLog(shard_set.urls, max_streak=len(shard_set.urls) + 1)
    ds = wds.WebDataset(list(shard_set.urls), shardshuffle=False, nodesplitter=None, workersplitter=None,
                        handler=skips.handler, empty_check=False, seed=0)
    ds = ds.compose(partial(check_shard_counts, expected=dict(zip(shard_set.urls, shard_set.counts)), skips=skips))
    images, labels, count = [], [], 0
    for sample in ds:
        try:
            image, label = decode_sample(sample, image_size, channels)
        except BadSample as bad:
            skips.add(bad.reason, sample.get("__url__", ""), sample.get("__key__", ""), bad.detail)
            continue
        images.append(image)
        labels.append(label)
        count += 1
        if len(images) == chunk:
            yield collate(images, labels)
            images, labels = [], []
        if max_images is not None and count >= max_images:
            break
    for reason, url, key, detail in skips.drain():
        log.warning("data: eval skipped %s %s in %s: %s", reason, key or "-", url or "-", detail)
    if not count:
        raise DataError(f"{pattern}: no readable eval images; check or rewrite the shards")
    if images:
        yield collate(images, labels)
