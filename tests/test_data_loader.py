"""The loader on real tar shards: counts, disjointness, exact resume, bad data, errors, the cache."""
from __future__ import annotations

import multiprocessing
import random
import shutil
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import (batches_as_indices, count_duplicates, data_cfg, indices_of, tree_digest,
                          write_index_shards)
from dgan.data import DataError, build_eval_images, build_train_data
from dgan.data.build import phantom_cache
from dgan.data.shard_sets import cached_shards


def build(folder: Path, *, batch: int = 4, rank: int = 0, world: int = 1, seed: int = 3, **cfg):
    return build_train_data(data_cfg(shards=str(folder / "train-*.tar"), **cfg), image_size=8, channels=1,
                            batch_size=batch, seed=seed, rank=rank, world_size=world)


@pytest.mark.parametrize("workers", [0, 2])
def test_deterministic_and_exact_resume(tmp_path, workers):
    write_index_shards(tmp_path, [30, 25, 9])
    data = build(tmp_path, num_workers=workers)
    assert data.batches_per_epoch == 64 // 4
    full = batches_as_indices(data, 0)
    assert len(full) == 16 and all(len(b) == 4 for b in full)
    assert batches_as_indices(data, 0) == full, "same epoch, different batches"
    for start in (1, 5, 15):
        assert batches_as_indices(data, 0, start) == full[start:]
    assert batches_as_indices(data, 0, 16) == []
    assert batches_as_indices(data, 1) != full
    flat = [i for b in full for i in b]
    assert sorted(flat) == list(range(64)), "one rank, one epoch: every sample exactly once"
    assert build(tmp_path, num_workers=workers, seed=4).epoch(0).__next__()[0].shape == (4, 1, 8, 8)


def test_simulated_ranks_shard_mode_disjoint(tmp_path):
    write_index_shards(tmp_path, [15, 15, 15, 15])
    ranks = [build(tmp_path, rank=r, world=2) for r in range(2)]
    assert [d.plan.mode for d in ranks] == ["shard", "shard"]
    for epoch in range(3):
        seen = [[i for b in batches_as_indices(d, epoch) for i in b] for d in ranks]
        assert [len(s) for s in seen] == [7 * 4, 7 * 4]
        assert not set(seen[0]) & set(seen[1]) and count_duplicates(seen[0] + seen[1]) == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_many_ranks_equal_counts(tmp_path, workers):
    sizes = [40, 7, 7, 3]  # very uneven, and fewer shards than 3 ranks x 2 workers
    write_index_shards(tmp_path, sizes)
    ranks = [build(tmp_path, batch=3, rank=r, world=3, num_workers=workers) for r in range(3)]
    assert {d.batches_per_epoch for d in ranks} == {57 // 9}
    assert ranks[0].plan.mode == "sample"
    union = set()
    for epoch in range(4):
        seen = [[i for b in batches_as_indices(d, epoch) for i in b] for d in ranks]
        assert [len(s) for s in seen] == [6 * 3] * 3
        flat = seen[0] + seen[1] + seen[2]
        assert count_duplicates(flat) == 0, "ranks overlap or repeat within an epoch"
        union |= set(flat)
    # 57 - 54 = 3 left-over samples per epoch rotate, so over epochs nothing is left out for good
    assert union == set(range(57))


def test_resampled_mode_equal_counts(tmp_path):
    write_index_shards(tmp_path, [10, 3])
    data = build(tmp_path, resampled=True, num_workers=2)
    assert data.plan.mode == "resampled" and data.batches_per_epoch == 3
    assert len(batches_as_indices(data, 0)) == 3 and len(batches_as_indices(data, 0, 2)) == 1


def _flip_inside_png(tar_path: Path, member_no: int) -> int:
    """Flip bytes in the middle of the PNG of the member_no-th sample; return that sample's index."""
    with tarfile.open(tar_path) as tar:
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")]
        target = pngs[member_no]
    raw = bytearray(tar_path.read_bytes())
    middle = target.offset_data + target.size // 2
    raw[middle:middle + 4] = bytes(b ^ 0xFF for b in raw[middle:middle + 4])
    tar_path.write_bytes(bytes(raw))
    return int(target.name[1:7])


def test_corrupt_image_zero_byte_and_truncated_shards(tmp_path):
    shards = write_index_shards(tmp_path, [12, 12, 12, 12])
    bad_index = _flip_inside_png(shards[0], 5)
    shards[1].write_bytes(b"")                                     # zero-byte shard
    shards[2].write_bytes(shards[2].read_bytes()[:4 * 1024 + 100])  # truncated mid-way
    data = build(tmp_path, num_workers=2, batch=4)
    assert data.batches_per_epoch == 48 // 4
    for epoch in range(2):
        batches = batches_as_indices(data, epoch)
        assert len(batches) == 12 and all(len(b) == 4 for b in batches)
        flat = [i for b in batches for i in b]
        assert bad_index not in flat and not set(flat) & (set(range(12, 24)) | set(range(26, 36)))
    # distinct bad things, counted once however often they are met (laps, epochs, workers)
    assert data.skipped() == {"corrupt_image": 1, "bad_shard": 2}
    # each sample is 4 tar blocks (2 headers + 2 padded files), so the truncated shard keeps 2
    readable = set(range(48)) - {bad_index} - set(range(12, 24)) - set(range(26, 36))
    x, _ = build_eval_images(data_cfg(source="shards", val_shards=str(tmp_path / "train-*.tar")),
                             image_size=8, channels=1)
    assert sorted(indices_of(x)) == sorted(readable)


def test_clear_errors_before_training(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        build(tmp_path / "nowhere")
    write_index_shards(tmp_path / "a", [5, 5])
    (tmp_path / "a" / "manifest.json").unlink()
    with pytest.raises(DataError, match=f"missing manifest {tmp_path / 'a' / 'manifest.json'}"):
        build(tmp_path / "a")
    write_index_shards(tmp_path / "b", [5, 5])
    with pytest.raises(DataError, match="train-000002.tar .*does not exist"):
        build_train_data(data_cfg(shards=str(tmp_path / "b" / "train-{000000..000002}.tar")), image_size=8,
                         channels=1, batch_size=2, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="lower train.batch_size"):
        build(tmp_path / "b", batch=4, world=4)
    with pytest.raises(DataError, match="data.val_shards"):
        build_eval_images(data_cfg(), image_size=8, channels=1)
    with pytest.raises(DataError, match="data.path .*does not exist"):
        build_train_data(data_cfg(source="npz", path=str(tmp_path / "x.npz"), cache_dir=str(tmp_path / "c")),
                         image_size=32, channels=1, batch_size=2, seed=0, rank=0, world_size=1)


def test_augmentation_seeded_in_range_and_resumable(tmp_path):
    write_index_shards(tmp_path, [16, 16])
    common = dict(batch=4, augment=True, affine_p=1.0, intensity_p=1.0, hflip_p=0.5)
    plain = [x for x, _ in build(tmp_path, batch=4).epoch(0)]
    first = [x for x, _ in build(tmp_path, **common).epoch(0)]
    again = [x for x, _ in build(tmp_path, **common).epoch(0)]
    resumed = [x for x, _ in build(tmp_path, **common).epoch(0, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first[3:], resumed)) and len(resumed) == len(first) - 3
    assert not all(torch.equal(a, b) for a, b in zip(first, plain))
    assert all(x.min() >= -1.0 and x.max() <= 1.0 and x.dtype == torch.float32 for x in first)


def test_global_rngs_untouched(tmp_path):
    write_index_shards(tmp_path, [20, 20])
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    for workers in (0, 2):
        list(build(tmp_path, num_workers=workers, shuffle_buffer=8).epoch(0))
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2]), "the loader moved the trainer's torch RNG"


def test_phantom_cache_built_once_and_reused(tmp_path):
    cfg = data_cfg(source="phantoms", num_images=96, cache_dir=str(tmp_path / "cache"))
    data = build_train_data(cfg, image_size=32, channels=1, batch_size=8, seed=0, rank=0, world_size=1)
    assert data.batches_per_epoch == 12 and data.manifest["splits"]["train"]["count"] == 96
    folder = next((tmp_path / "cache").glob("phantoms-*"))
    before = tree_digest(folder)
    again = build_train_data(cfg, image_size=32, channels=1, batch_size=8, seed=0, rank=0, world_size=1)
    assert again.manifest["hash"] == data.manifest["hash"] and tree_digest(folder) == before
    x, y = next(data.epoch(0))
    assert x.shape == (8, 1, 32, 32) and x.min() == -1.0 and set(y.tolist()) <= {0, 1}
    labels = [int(v) for _, y in data.epoch(0) for v in y]
    assert 0.3 < np.mean(labels) < 0.7, "phantom labels should be about balanced"
    # other parameters -> another cache entry; eval phantoms come from a fresh seed
    cfg.phantom_seed = 99
    other = build_train_data(cfg, image_size=32, channels=1, batch_size=8, seed=0, rank=0, world_size=1)
    assert other.manifest["hash"] != data.manifest["hash"] and len(list((tmp_path / "cache").glob("phantoms-*"))) == 2
    ex, _ = build_eval_images(cfg, image_size=32, channels=1, max_images=8)
    tx, _ = build_eval_images(cfg, image_size=32, channels=1, split="train", max_images=8)
    assert ex.shape == (8, 1, 32, 32) and not torch.equal(ex, tx)


def _race(cache_dir: str, key: int, barrier) -> None:
    def build(out: Path) -> None:
        _build_tiny(out)
        Path(cache_dir, f"built-{multiprocessing.current_process().pid}").touch()

    barrier.wait()
    cached_shards(Path(cache_dir), "race", {"k": key}, build)


def test_cache_race_builds_once_and_failed_build_leaves_nothing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_race, args=(str(tmp_path), 1, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(list(tmp_path.glob("built-*"))) == 1, "more than one process built the cache"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("built-"))[0].startswith("race-")

    def crash(out: Path) -> None:
        raise KeyboardInterrupt  # like a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        cached_shards(tmp_path / "c2", "x", {"k": 2}, crash)
    assert list((tmp_path / "c2").iterdir()) == [], "a half-built cache or a stale lock was left behind"
    # a lock left by a builder that was SIGKILLed (dead pid) does not block the next run
    dead = ctx.Process(target=lambda: None)
    dead.start()
    dead.join()
    folder = cached_shards(tmp_path / "c3", "race", {"k": 3}, _build_tiny)
    lock = folder.parent / f".{folder.name}.lock"
    shutil.rmtree(folder)
    lock.write_text(f"{socket.gethostname()} {dead.pid}\n")
    start = time.monotonic()
    assert (cached_shards(tmp_path / "c3", "race", {"k": 3}, _build_tiny) / "manifest.json").is_file()
    assert time.monotonic() - start < 5 and not lock.exists()


def _build_tiny(out: Path) -> None:
    from dgan.data.shards import array_records, write_shards

    write_shards({"train": array_records(np.zeros((2, 8, 8), np.uint8), np.zeros(2, np.int64), "t")}, out,
                 resolution=8, channels=1, classes=[], source={}, progress=False)


def test_phantoms_cache_quick(tmp_path):
    start = time.perf_counter()
    phantom_cache(data_cfg(num_images=2048, cache_dir=str(tmp_path)), image_size=32, channels=1)
    assert time.perf_counter() - start < 30, "the quick start's cache must build in seconds"
