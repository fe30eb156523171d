"""The real images an evaluation compares against: the held-out split (or the training images) of
a run's data config, their cache key, their labels as the generator's condition, and the record of
what was used. Shared by dgan.evaluate and the tasks (inpaint, superres), which sit beside it."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional

import torch

from dgan.errors import EvalError
from dgan.pixels import to_uint8


LABEL_SHIFT_WARNING = (
    "reference is the npz 'val' split: in the shared PneumoniaMNIST copy its label mix differs from "
    "train (74% vs 90% pneumonia, mean pixel 145.1 vs 147.0), so FID/KID also measure that shift, "
    "not only sample quality; for quality numbers use --reference train (and say so)")


REFERENCES = ("val", "train")


@dataclasses.dataclass
class EvalResult:
    """What one evaluation produced. ``samples`` (uint8, index order) and ``artefacts`` (the audit's
    pictures and distance arrays, for the report) are set on rank 0 only."""

    metrics: dict[str, float]
    info: dict[str, Any]
    samples: Optional[torch.Tensor] = None
    sample_ranks: Optional[torch.Tensor] = None
    artefacts: dict[str, Any] = dataclasses.field(default_factory=dict)


def reference_split(cfg, reference: str) -> str:
    """The data split behind --reference: for npz, 'train' means the split the run trained on."""
    if reference not in REFERENCES:
        raise EvalError(f"--reference {reference!r}: use one of {', '.join(REFERENCES)}")
    if reference == "train" and cfg.data.source == "npz":
        return cfg.data.split
    return reference


def load_reference(cfg, reference: str, max_images: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images (float [-1, 1]) and labels, preprocessed like the training data."""
    from dgan.data import build_eval_images  # albumentations and webdataset: seconds of start-up

    images, labels = build_eval_images(cfg.data, image_size=cfg.model.image_size, channels=cfg.model.channels,
                                       split=reference_split(cfg, reference), max_images=max_images)
    return _enough(images, labels, reference)


def _enough(images: torch.Tensor, labels: torch.Tensor, reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape[0] < 2:
        raise EvalError(f"reference split {reference!r} has {images.shape[0]} image(s); FID/KID need at least 2")
    return images, labels


def load_reference_u8(cfg, reference: str, max_images: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `load_reference`, as uint8 [0, 255] (what the metrics score), read in chunks: the audit's
    100k training images cost 100 MB at 32 px, never the 400 MB+ of a whole float32 copy."""
    from dgan.data import iter_eval_images  # as above

    chunks = [(to_uint8(x), y) for x, y in iter_eval_images(cfg.data, image_size=cfg.model.image_size,
                                                            channels=cfg.model.channels,
                                                            split=reference_split(cfg, reference),
                                                            max_images=max_images)]
    return _enough(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]), reference)


def reference_cache_key(cfg, reference: str, images: torch.Tensor) -> str:
    """Cache key of the reference statistics: the shard manifest hash where there is one, else the bytes."""
    digest = None
    pattern = {"val": cfg.data.val_shards, "train": cfg.data.shards}[reference]
    if cfg.data.source == "shards" and pattern:
        from dgan.data.shard_sets import resolve_shards  # as above: only for shard data

        digest = str(resolve_shards(pattern).manifest.get("hash", ""))[:16] or None
    if digest is None:
        digest = hashlib.blake2b(images.contiguous().numpy().tobytes(), digest_size=8).hexdigest()
    return f"{cfg.data.source}_{reference}_{digest}"


def conditioning_labels(cfg, labels: torch.Tensor) -> Optional[torch.Tensor]:
    """Reference labels for a conditional G when they fit its classes; else unconditional (None)."""
    k = cfg.model.num_classes
    if k > 0 and labels.numel() and int(labels.min()) >= 0 and int(labels.max()) < k:
        return labels
    return None


def reference_info(cfg, reference: str, count: int, cache_key: Optional[str]) -> dict[str, Any]:
    info = {"split": reference_split(cfg, reference), "requested": reference, "source": cfg.data.source,
            "num_images": count, "cache_key": cache_key}
    if cfg.data.source == "npz":
        info["path"] = cfg.data.path
    if cfg.data.source == "npz" and reference == "val":
        info["warning"] = LABEL_SHIFT_WARNING
    return info
