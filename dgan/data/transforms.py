"""Training augmentation (albumentations) built from DataConfig; evaluation uses none.

The pipeline works on float32 HxWxC images in [0, 1] and returns the same. Every transform
has its own probability from the config (crop_p, hflip_p, vflip_p, affine_p, intensity_p).

Determinism: the loader reseeds the pipeline once per batch from (run seed, epoch, rank,
worker, batch index) via `TrainTransform.reseed`, so augmentation is reproducible and a
resumed epoch augments its remaining batches exactly as the uninterrupted one would have,
without replaying the augmentation of the batches it skips.

Note for chest X-rays and other images with a fixed left/right anatomy: horizontal flips
produce anatomically impossible images; set data.hflip_p=0 for such data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class AugmentSettings:
    """The part of DataConfig the augmentation needs; small and picklable for workers. No defaults
    here: DataConfig holds the one copy of them."""
    image_size: int
    hflip_p: float
    vflip_p: float
    affine_p: float
    crop_p: float
    intensity_p: float

    @classmethod
    def from_config(cls, cfg: Any, image_size: int) -> Optional["AugmentSettings"]:
        """From a DataConfig; None when augmentation is off, or every probability is zero (nothing to do)."""
        if not cfg.augment:
            return None
        settings = cls(image_size, *(float(getattr(cfg, name)) for name in
                                     ("hflip_p", "vflip_p", "affine_p", "crop_p", "intensity_p")))
        probabilities = (settings.hflip_p, settings.vflip_p, settings.affine_p, settings.crop_p, settings.intensity_p)
        return settings if any(p > 0 for p in probabilities) else None


class TrainTransform:
    """A seeded albumentations Compose over float32 [0, 1] HxWxC images."""

    def __init__(self, settings: AugmentSettings, seed: int = 0) -> None:
        # imported here: albumentations takes seconds to import and is only needed with augment on
        import albumentations as A
        import cv2

        size = settings.image_size
        steps = [
            A.RandomResizedCrop(size=(size, size), scale=(0.8, 1.0), ratio=(0.9, 1.1), p=settings.crop_p),
            A.HorizontalFlip(p=settings.hflip_p),
            A.VerticalFlip(p=settings.vflip_p),
            # small geometric jitter; the constant 0 fill is the dark background of medical images
            A.Affine(scale=(0.95, 1.05), translate_percent=(-0.04, 0.04), rotate=(-7, 7),
                     border_mode=cv2.BORDER_CONSTANT, fill=0, p=settings.affine_p),
            A.RandomBrightnessContrast(brightness_limit=0.08, contrast_limit=0.1, p=settings.intensity_p),
            A.RandomGamma(gamma_limit=(90, 110), p=settings.intensity_p),
        ]
        self._compose = A.Compose([s for s in steps if s.p > 0], seed=seed)

    def reseed(self, seed: int) -> None:
        self._compose.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = self._compose(image=image)["image"]
        if out.ndim == 2:  # some transforms drop a trailing singleton channel axis
            out = out[:, :, None]
        return np.clip(out, 0.0, 1.0, out=out if out.dtype == np.float32 else None).astype(np.float32, copy=False)


def build_train_transform(settings: Optional[AugmentSettings], seed: int = 0) -> Optional[TrainTransform]:
    return None if settings is None else TrainTransform(settings, seed)
