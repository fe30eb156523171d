"""Inpainting masks: bool H x W numpy arrays, **True (1) = the region to generate (the hole)**, False =
known pixels kept from the input. A mask PNG follows the same rule with white = generate: any non-zero
pixel (in any colour channel; alpha is ignored) is part of the hole. Used by dgan/inpaint.py.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dgan.errors import UsageError


MASK_TYPES = ("box", "brush")



# Two aspect ratios this close are "the same" (integer image sizes round the ratio a little).
_ASPECT_TOLERANCE = 0.02



class InpaintError(UsageError):
    """A bad input for inpainting; the message is one line that says what is wrong and how to fix it."""



def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))



def check_mask(mask: np.ndarray, what: str) -> np.ndarray:
    """Refuse masks that would not be inpainting: an empty hole (nothing to do) or no known pixel
    (that is unconditional sampling; use python -m dgan.sample without --inpaint)."""
    if not mask.any():
        raise InpaintError(f"{what}: the mask is empty (no pixel to generate); white (non-zero) marks the hole")
    if mask.all():
        raise InpaintError(f"{what}: the mask covers the whole image, so nothing is known; use python -m "
                           "dgan.sample without --inpaint for unconditional samples")
    return mask



def box_mask(size: int | Sequence[int], box: Sequence[int] | None = None) -> np.ndarray:
    """A rectangular hole. `box` = (top, left, height, width) in pixels; None: the centred box of half
    the height and width (a quarter of the area)."""
    h, w = _hw(size)
    if box is None:
        box = ((h - h // 2) // 2, (w - w // 2) // 2, h // 2, w // 2)
    top, left, bh, bw = (int(v) for v in box)
    if bh < 1 or bw < 1 or top < 0 or left < 0 or top + bh > h or left + bw > w:
        raise InpaintError(f"box (top, left, height, width) = {tuple(box)} does not fit a {h}x{w} image")
    mask = np.zeros((h, w), dtype=bool)
    mask[top:top + bh, left:left + bw] = True
    return check_mask(mask, "box mask")



def brush_mask(size: int | Sequence[int], seed: int, *, min_fraction: float = 0.1,
               max_fraction: float = 0.3, max_strokes: int = 12) -> np.ndarray:
    """Random free-form brush strokes (polylines with round joints), drawn from `seed` alone.

    Strokes are added until the hole covers a target fraction drawn from [min_fraction, max_fraction]
    (or max_strokes is reached), so the area is controlled while the shape varies; every vertex is
    clipped to the image, so strokes never leave it.
    """
    import cv2

    h, w = _hw(size)
    rng = np.random.default_rng(seed)
    target = rng.uniform(min_fraction, max_fraction)
    width = max(1, round(min(h, w) / 10))  # ~3 px at 32 px: thin enough to need context on both sides
    canvas = np.zeros((h, w), dtype=np.uint8)
    for _ in range(max_strokes):
        point = np.array([rng.uniform(0, w - 1), rng.uniform(0, h - 1)])
        for _ in range(int(rng.integers(2, 6))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35) * max(h, w)
            nxt = np.clip(point + length * np.array([math.cos(angle), math.sin(angle)]), 0, [w - 1, h - 1])
            cv2.line(canvas, tuple(int(v) for v in point.round()), tuple(int(v) for v in nxt.round()), 255,
                     thickness=width, lineType=cv2.LINE_8)
            point = nxt
        if (canvas > 0).mean() >= target:
            break
    return check_mask(canvas > 0, f"brush mask (seed {seed})")



def make_mask(kind: str, size: int | Sequence[int], seed: int = 0) -> np.ndarray:
    """A generated mask by name: "box" (centred, seed unused) or "brush" (seeded strokes)."""
    if kind == "box":
        return box_mask(size)
    if kind == "brush":
        return brush_mask(size, seed)
    raise InpaintError(f"mask type {kind!r}: use one of {', '.join(MASK_TYPES)}")



def mask_from_array(raw: np.ndarray, image_hw: Sequence[int], image_size: int, what: str) -> np.ndarray:
    """A mask image (any dtype, H x W or H x W x C) -> bool image_size x image_size, True = generate.

    The mask must have the input image's aspect ratio (any resolution): it is then letterboxed like
    the image (the padding is known, 0) and resized with nearest neighbour, so the hole stays binary
    and lands on the same pixels as in the preprocessed image.
    """
    import cv2

    from dgan.data.sources import letterbox_resize  # cv2/pydicom/nibabel: slow to import

    if raw.ndim == 3:
        raw = raw[:, :, :3] if raw.shape[2] >= 3 else raw[:, :, :1]  # drop alpha: transparency is not "hole"
        raw = raw.any(axis=2)
    (mh, mw), (ih, iw) = raw.shape[:2], tuple(int(v) for v in image_hw)
    if abs(mh / mw - ih / iw) > _ASPECT_TOLERANCE * ih / iw:
        raise InpaintError(f"{what}: mask is {mw}x{mh} (WxH) but the image is {iw}x{ih}; give a mask of the "
                           "image's size (or at least its aspect ratio)")
    binary = check_mask(raw != 0, what)
    square = letterbox_resize(binary.astype(np.uint8), max(mh, mw))  # pads with the minimum: 0, known
    resized = cv2.resize(square, (image_size, image_size), interpolation=cv2.INTER_NEAREST) > 0
    return check_mask(resized, f"{what} (resized to {image_size}x{image_size})")
