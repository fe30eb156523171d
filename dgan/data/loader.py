"""The training loader: webdataset tar shards -> (x in [-1, 1], y) batches, DDP-safe.

Pipeline per DataLoader worker ("slot"): `wds.WebDataset` with explicit rank/worker
splitters -> (sample-level split) -> seeded shuffle buffer -> PNG decode (bad samples
skipped and counted) -> batch -> seeded albumentations -> tensors. Batches are formed in
the workers; `wds.WebLoader(...).with_epoch(n)` takes exactly n of them per epoch.

Guarantees, finite mode (data.resampled=false):
- Equal counts: every rank yields exactly `batches_per_epoch = N // (batch_size * world_size)`
  full batches per epoch (N = samples in the manifest), whatever the shard sizes, the number
  of shards or workers, and however many samples turn out to be corrupt: a slot whose
  samples run out starts another pass ("lap") over its own samples. So DDP never waits on
  a rank that ran dry. Impossible setups (N < batch_size * world_size) fail at build time.
- Disjointness: within an epoch no sample is given to two ranks (or two workers).
  * shard mode, when every slot (rank x worker) can be given whole shards holding at least
    the samples it needs: shards are dealt to slots from an epoch-seeded order;
  * sample mode, otherwise (e.g. fewer shards than ranks x workers): every slot reads all
    shards in the same epoch-seeded order and keeps the samples whose global index maps to
    it (batch-aligned modulo, rotated per epoch so the N mod (B*W) left-over samples differ
    from epoch to epoch). Non-owned samples are never decoded.
  Without corrupt samples, no sample is repeated on a rank within an epoch.
- Exact resume: the batches are a pure function of (seed, epoch, rank, world_size,
  num_workers, batch_size, shards); `epoch(e, k)` yields exactly batches k, k+1, ... of
  `epoch(e, 0)`. Resuming with a different num_workers or world size is valid training but
  not the same batch order. Skipped-ahead batches are decoded (to know which samples are
  corrupt) but not augmented.

Resampled mode (data.resampled=true): each slot draws shards with replacement (webdataset's
own unseeded resampling), so ranks may overlap and exact resume does NOT hold; the batch
count per epoch is still exactly `batches_per_epoch` on every rank, for any `start_batch`.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import cv2
import numpy as np
import torch
from torch import Tensor

from dgan.data.sources import ChannelError, DataError, convert_channels, letterbox_resize
from dgan.data.transforms import AugmentSettings, build_train_transform
from dgan.seeding import Stream, derive_seed, stream_generator

log = logging.getLogger("dgan.data")

MAX_LOGGED_SKIPS = 20


def worker_batches(batches: int, workers: int, worker: int) -> int:
    """How many of a rank's first `batches` batches come from `worker` (DataLoader round robin)."""
    return max(0, (batches - worker + workers - 1) // workers)


@dataclass(frozen=True)
class LoaderPlan:
    """Everything a worker needs to produce its batches; small and picklable."""
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    batches_per_epoch: int
    mode: str                 # "shard" | "sample" | "resampled"
    seed: int
    shuffle_buffer: int
    image_size: int
    channels: int
    augment: Optional[AugmentSettings] = None

    @property
    def slots(self) -> int:
        return max(1, self.num_workers)

    @property
    def total(self) -> int:
        return sum(self.counts)


# ----------------------------------------------------------------------------------------
# Who reads what


def shard_order(plan: LoaderPlan, epoch: int) -> list[int]:
    """The epoch's shard order: identical on every rank, so all ranks agree on ownership."""
    order = list(range(len(plan.urls)))
    random.Random(derive_seed(plan.seed, Stream.DATA_ORDER, epoch)).shuffle(order)
    return order


def assign_shards(plan: LoaderPlan, epoch: int) -> Optional[list[int]]:
    """Slot (rank * slots + worker) of every shard, or None when some slot would run short.

    Largest shards first, each to the slot with the biggest remaining need; equal-size
    shards are interchangeable, so whether this succeeds does not depend on the epoch.
    """
    slots = plan.slots
    need = [plan.batch_size * worker_batches(plan.batches_per_epoch, slots, s % slots)
            for s in range(plan.world_size * slots)]
    have = [0] * len(need)
    owner = [-1] * len(plan.urls)
    for i in sorted(shard_order(plan, epoch), key=lambda i: -plan.counts[i]):
        slot = max(range(len(need)), key=lambda s: need[s] - have[s])
        owner[i] = slot
        have[slot] += plan.counts[i]
    return owner if all(h >= n for h, n in zip(have, need)) else None


def sample_owner_fn(plan: LoaderPlan, epoch: int):
    """Global sample index -> owning slot (or -1: this epoch's left-over), for sample mode."""
    total, batch, world, slots = plan.total, plan.batch_size, plan.world_size, plan.slots
    offset = derive_seed(plan.seed, Stream.DATA_OFFSET, epoch) % total
    used_batches = plan.batches_per_epoch * world

    def owner(index: int) -> int:
        global_batch = ((index + offset) % total) // batch
        if global_batch >= used_batches:
            return -1
        rank, local = global_batch % world, global_batch // world
        return rank * slots + local % slots

    return owner


def split_by_rank(src: Iterator[dict], *, plan: LoaderPlan, epoch: int, owner: Optional[list[int]]) -> Iterator[dict]:
    """webdataset node splitter with rank/world size explicit (no process group needed)."""
    if plan.mode == "resampled":
        yield from src  # an endless random stream already; each rank draws its own
        return
    by_url = {entry["url"]: entry for entry in src}
    for i in shard_order(plan, epoch):
        if owner is None or owner[i] // plan.slots == plan.rank:
            yield by_url[plan.urls[i]]


def split_by_worker(src: Iterator[dict], *, plan: LoaderPlan, epoch: int, worker: int, lap: int,
                    owner: Optional[list[int]]) -> Iterator[dict]:
    """webdataset worker splitter for the *logical* worker; sample mode passes all shards."""
    if owner is None:
        yield from src
        return
    index = {url: i for i, url in enumerate(plan.urls)}
    mine = [entry for entry in src if owner[index[entry["url"]]] % plan.slots == worker]
    random.Random(derive_seed(plan.seed, Stream.DATA_SLOT, epoch, plan.rank, worker, lap)).shuffle(mine)
    yield from mine


def check_shard_counts(src: Iterator[dict], *, expected: dict[str, int], skips: "SkipLog") -> Iterator[dict]:
    """Report shards that end early: a truncated tar often just stops without an error."""
    url, seen = None, 0
    for sample in src:
        if sample.get("__url__") != url:
            _report_short(url, seen, expected, skips)
            url, seen = sample.get("__url__"), 0
        seen += 1
        yield sample
    _report_short(url, seen, expected, skips)


def _report_short(url: Optional[str], seen: int, expected: dict[str, int], skips: "SkipLog") -> None:
    if url is not None and seen < expected.get(url, 0):
        skips.add("bad_shard", url, "", f"only {seen} of its {expected[url]} samples could be read (truncated?)")


def own_samples(src: Iterator[dict], *, plan: LoaderPlan, epoch: int, worker: int) -> Iterator[dict]:
    owner = sample_owner_fn(plan, epoch)
    me = plan.rank * plan.slots + worker
    for index, sample in enumerate(src):
        if owner(index) == me:
            yield sample


# ----------------------------------------------------------------------------------------
# Bad data accounting


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore the stop signals; only the trainer acts on them.

    torchrun forwards SIGTERM/SIGUSR1 to each rank's whole process group, and a terminal
    sends Ctrl-C's SIGINT to the whole foreground group: by default both would kill the
    workers, and the rank would die on "DataLoader worker exited unexpectedly" instead of
    saving its checkpoint at the next step boundary.
    """
    import signal
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class SkipLog:
    """Skip events of one worker: (reason, url, key, detail); shipped to the main process with each batch."""

    def __init__(self, urls: tuple[str, ...], max_streak: int) -> None:
        self.urls, self.max_streak = urls, max_streak
        self.events: list[tuple[str, str, str, str]] = []
        self.streak = 0

    def add(self, reason: str, url: str, key: str, detail: str) -> None:
        self.events.append((reason, url, key, detail[:200]))

    def handler(self, exn: BaseException) -> bool:
        """webdataset exception handler: count the unreadable shard and go on."""
        text = " ".join(str(a) for a in getattr(exn, "args", ()))
        url = next((u for u in self.urls if u in text), "")
        first = str(exn.args[0]) if getattr(exn, "args", None) else repr(exn)
        self.add("bad_shard" if url else "bad_sample", url, "", f"{type(exn).__name__}: {first}")
        self.streak += 1
        if self.streak > self.max_streak:
            raise DataError(f"{self.streak} unreadable shards in a row and no good sample (last: {url or text[:200]}); "
                            "check the shard files, or rewrite them with python -m dgan.data.shards")
        return True

    def drain(self) -> list[tuple[str, str, str, str]]:
        events, self.events = self.events, []
        return events


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_sample(sample: dict, image_size: int, channels: int) -> tuple[np.ndarray, int]:
    """One shard sample -> (float32 HxWxC image in [0, 1], label). Raises BadSample."""
    data = sample.get("png")
    if data is None:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample("missing_image", f"no .png member (has {have})")
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        arr = None
    if arr is None:
        raise BadSample("corrupt_image", "PNG does not decode")
    try:
        arr = convert_channels(arr, channels, bgr=True)
    except ChannelError as exn:
        raise BadSample("bad_channels", str(exn)) from None
    if arr.shape[0] != image_size or arr.shape[1] != image_size:
        arr = letterbox_resize(arr, image_size)
    scale = np.float32(1.0 / 65535.0 if arr.dtype == np.uint16 else 1.0 / 255.0)
    image = arr.astype(np.float32) * scale
    try:
        label = int(sample.get("cls", b""))
    except ValueError:
        raise BadSample("bad_label", f"label {sample.get('cls')!r} is not an integer") from None
    return (image[:, :, None] if image.ndim == 2 else image), label


# ----------------------------------------------------------------------------------------
# One rank's stream


def lap_dataset(plan: LoaderPlan, epoch: int, worker: int, lap: int, skips: SkipLog):
    """One pass of this slot over its samples, as a webdataset pipeline (raw, undecoded)."""
    import webdataset as wds

    owner = assign_shards(plan, epoch) if plan.mode == "shard" else None
    ds = wds.WebDataset(
        list(plan.urls), resampled=plan.mode == "resampled", shardshuffle=False,
        nodesplitter=partial(split_by_rank, plan=plan, epoch=epoch, owner=owner),
        workersplitter=partial(split_by_worker, plan=plan, epoch=epoch, worker=worker, lap=lap, owner=owner),
        handler=skips.handler, empty_check=False,
        seed=derive_seed(plan.seed, Stream.DATA_ORDER, epoch),  # never the global RNG: keeps the trainer's RNG intact
    )
    ds = ds.compose(partial(check_shard_counts, expected=dict(zip(plan.urls, plan.counts)), skips=skips))
    if plan.mode == "sample":
        ds = ds.compose(partial(own_samples, plan=plan, epoch=epoch, worker=worker))
    if plan.shuffle_buffer > 1:
        rng = random.Random(derive_seed(plan.seed, Stream.DATA_SHUFFLE, epoch, plan.rank, worker, lap))
        ds = ds.shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=rng)
    return ds


def decoded_samples(plan: LoaderPlan, epoch: int, worker: int, skips: SkipLog) -> Iterator[tuple[np.ndarray, int]]:
    """Endless decoded samples of one slot: lap after lap over the same (own) samples."""
    for lap in itertools.count():
        good = 0
        for sample in lap_dataset(plan, epoch, worker, lap, skips):
            try:
                item = decode_sample(sample, plan.image_size, plan.channels)
            except BadSample as bad:
                skips.add(bad.reason, sample.get("__url__", ""), sample.get("__key__", ""), bad.detail)
                continue
            good += 1
            skips.streak = 0
            yield item
        if good == 0:
            raise DataError(f"rank {plan.rank} worker {worker}: none of its samples could be read ({plan.mode} mode, "
                            f"shards from {plan.urls[0]}; see the skipped-sample warnings); check or rewrite the shards")


class RankStream(torch.utils.data.IterableDataset):
    """This rank's batches for one epoch, from batch `start_batch` on; endless (cut by with_epoch)."""

    def __init__(self, plan: LoaderPlan, epoch: int, start_batch: int) -> None:
        super().__init__()
        self.plan, self.epoch, self.start_batch = plan, epoch, start_batch

    def __iter__(self):
        plan = self.plan
        info = torch.utils.data.get_worker_info()
        # The DataLoader takes batch j from worker j % workers. A resumed epoch starts at
        # batch k, so physical worker i plays the logical worker that produced batch k + i.
        worker = ((info.id if info else 0) + self.start_batch) % plan.slots
        skip = worker_batches(self.start_batch, plan.slots, worker)
        skips = SkipLog(plan.urls, max_streak=max(100, 10 * len(plan.urls)))
        transform = build_train_transform(plan.augment)
        samples = decoded_samples(plan, self.epoch, worker, skips)
        for index in itertools.count():
            chunk = list(itertools.islice(samples, plan.batch_size))
            if index < skip:
                continue
            images = [img for img, _ in chunk]
            if transform is not None:
                transform.reseed(derive_seed(plan.seed, Stream.DATA_AUG, self.epoch, plan.rank, worker, index))
                images = [transform(img) for img in images]
            yield collate(images, [label for _, label in chunk]), skips.drain()


def collate(images: list[np.ndarray], labels: list[int]) -> tuple[Tensor, Tensor]:
    """HxWxC float [0, 1] images -> x float32 [B, C, H, W] in [-1, 1], y int64 [B]."""
    batch = np.stack(images).transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(batch))
    x.mul_(2.0).sub_(1.0)
    return x, torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------------------
# Public API


class TrainData:
    """Per-rank training batches. See the module docstring for the guarantees."""

    def __init__(self, plan: LoaderPlan, manifest: dict) -> None:
        self.plan = plan
        self.manifest = manifest
        self.batches_per_epoch = plan.batches_per_epoch
        self._seen: set[tuple[str, str, str]] = set()
        self._counts: Counter = Counter()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches start_batch..batches_per_epoch-1 of `epoch`: x float32 [B,C,H,W] in [-1,1], y int64 [B]."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        import webdataset as wds

        wanted = self.batches_per_epoch - start_batch
        if wanted == 0:
            return
        plan = self.plan
        # an explicit generator: the DataLoader would otherwise draw its base seed from the
        # global torch RNG and shift the trainer's random stream on every epoch or resume
        generator = stream_generator(None, plan.seed, Stream.DATA_TORCH, epoch, plan.rank)
        loader = wds.WebLoader(RankStream(plan, epoch, start_batch), batch_size=None, num_workers=plan.num_workers,
                               generator=generator, prefetch_factor=4 if plan.num_workers else None,
                               persistent_workers=False,
                               worker_init_fn=ignore_stop_signals if plan.num_workers else None).with_epoch(wanted)
        produced = 0
        for (x, y), events in loader:
            self._record(events)
            produced += 1
            yield x, y
        if produced != wanted:  # cannot happen with endless worker streams; never hand DDP a short epoch
            raise RuntimeError(f"rank {plan.rank}: the loader gave {produced} of {wanted} batches in epoch {epoch}")

    def _record(self, events: list[tuple[str, str, str, str]]) -> None:
        for reason, url, key, detail in events:
            ident = (reason, url, key or detail)
            if ident in self._seen:
                continue  # the same bad sample met again in a later lap or epoch
            self._seen.add(ident)
            self._counts[reason] += 1
            total = sum(self._counts.values())
            if total <= MAX_LOGGED_SKIPS:
                log.warning("data: skipped %s %s in %s: %s", reason, key or "-", url or "-", detail)
            if total == MAX_LOGGED_SKIPS:
                log.warning("data: further skipped samples are counted but not logged one by one")

    def skipped(self) -> dict[str, int]:
        """Distinct corrupt/unreadable samples (or shards) met so far on this rank, by reason."""
        return dict(self._counts)
