"""Procedural 2D phantoms: the built-in dataset, so the quick start needs no download.

Each phantom is a dark background with a body-outline ellipse and a few organ-like
ellipses, with CT-like (air-dark lungs, bright bone ring) or MRI-like (bright fat rim,
varied soft tissue) intensities, plus mild noise. Half of them carry a small bright
lesion; the label is 1 exactly when the lesion is present, so class-conditional training
has a visible signal to learn.

Phantom i depends only on (seed, i) and the size, not on how many are made, so a larger
`num_images` extends a smaller set instead of replacing it.
"""
from __future__ import annotations

import numpy as np

SUPERSAMPLE = 2        # render at 2x and area-average down, so edges are anti-aliased
PHANTOM_VERSION = 1    # bump when the look changes: it is part of the cache key


def _ellipse(grid: tuple[np.ndarray, np.ndarray], cy: float, cx: float, ry: float, rx: float,
             angle_rad: float) -> np.ndarray:
    yy, xx = grid
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    dy, dx = yy - cy, xx - cx
    u = (dx * cos + dy * sin) / rx
    v = (-dx * sin + dy * cos) / ry
    return u * u + v * v <= 1.0


def _grid(size_px: int) -> tuple[np.ndarray, np.ndarray]:
    n = size_px * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0  # [-1, 1] image plane
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return yy, xx


def _phantom(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, int]:
    """One phantom as float32 [0, 1] on the supersampled grid's plane, and its lesion label."""
    n = grid[0].shape[0]
    size_px = n // SUPERSAMPLE
    img = np.zeros((n, n), np.float32)
    ry, rx = rng.uniform(0.6, 0.85), rng.uniform(0.7, 0.92)
    tilt = rng.uniform(-0.2, 0.2)
    body = _ellipse(grid, rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), ry, rx, tilt)
    ct_like = rng.random() < 0.5
    if ct_like:
        img[body] = rng.uniform(0.42, 0.52)                  # soft tissue
        ring = body & ~_ellipse(grid, 0.0, 0.0, ry * 0.9, rx * 0.9, tilt)
        img[ring] = rng.uniform(0.8, 0.9)                    # bone-like rim
        for side in (-1.0, 1.0):                             # two dark lungs
            lung = _ellipse(grid, rng.uniform(-0.15, 0.05), side * rx * rng.uniform(0.35, 0.5),
                            ry * rng.uniform(0.45, 0.6), rx * rng.uniform(0.22, 0.32), rng.uniform(-0.3, 0.3))
            img[lung & body] = rng.uniform(0.05, 0.15)
    else:
        img[body] = rng.uniform(0.55, 0.7)                   # bright fat rim first
        inner = _ellipse(grid, 0.0, 0.0, ry * 0.88, rx * 0.88, tilt)
        img[inner] = rng.uniform(0.25, 0.35)
        for _ in range(int(rng.integers(2, 5))):             # organs of varied contrast
            organ = _ellipse(grid, rng.uniform(-0.4, 0.4), rng.uniform(-0.45, 0.45),
                             rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.3), rng.uniform(0, np.pi))
            img[organ & inner] = rng.uniform(0.15, 0.75)
    label = int(rng.random() < 0.5)
    if label:
        radius = rng.uniform(0.07, 0.12)
        lesion = _ellipse(grid, rng.uniform(-0.35, 0.35), rng.uniform(-0.4, 0.4),
                          radius, radius * rng.uniform(0.8, 1.25), rng.uniform(0, np.pi))
        img[lesion & body] = rng.uniform(0.92, 1.0)
    img = img.reshape(size_px, SUPERSAMPLE, size_px, SUPERSAMPLE).mean(axis=(1, 3))
    img += rng.normal(0.0, 0.015, img.shape).astype(np.float32) * (img > 0.02)
    return np.clip(img, 0.0, 1.0), label


def make_phantoms(num_images: int, size_px: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [num_images, size_px, size_px] and int64 labels, phantoms start..start+num_images-1."""
    images = np.empty((num_images, size_px, size_px), np.uint8)
    labels = np.empty(num_images, np.int64)
    grid = _grid(size_px)
    for i in range(num_images):
        rng = np.random.default_rng([seed, start + i])
        img, labels[i] = _phantom(rng, grid)
        images[i] = np.round(img * 255.0).astype(np.uint8)
    return images, labels


def eval_phantom_seed(seed: int) -> int:
    """A seed whose phantoms never coincide with the training ones (a separate stream)."""
    return int(np.random.SeedSequence([seed, 0xE7A1]).generate_state(1)[0])
