"""Sample diversity by MS-SSIM between random pairs of images of one set (torchmetrics): high
means similar pairs, so a collapsed model scores near 1. Compare a sample set's value with the real
images' own (the real-real floor): a model that covers the data should land close to it.

MS-SSIM's standard five scales need images of at least 176 px with its 11-px kernel (torchmetrics'
rule); smaller images use as many scales as fit (two at 32 px, four at 128 px), with the standard
weights of those scales renormalised to sum to 1. Values are comparable within one image size only.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

KERNEL = 11
BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as torchmetrics has them
PAIRS = 1000


def scales_for(size: int) -> int:
    """How many scales torchmetrics accepts at this image size with the 11-px kernel (at least 1)."""
    def fits(s: int) -> bool:
        return size >= 2 ** s and size // max(1, s - 1) ** 2 > KERNEL - 1 and size // 2 ** (s - 1) > KERNEL // 2
    return max([s for s in range(1, len(BETAS) + 1) if fits(s)], default=1)


@torch.no_grad()
def ms_ssim_diversity(images: Tensor, pairs: int = PAIRS, seed: int = 0, batch: int = 250) -> float:
    """Mean MS-SSIM over `pairs` random pairs of distinct images of a uint8 N x C x H x W set."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 images, got {n}")
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (pairs,), generator=gen)
    second = (first + torch.randint(1, n, (pairs,), generator=gen)) % n  # never the same image
    betas = BETAS[:scales_for(min(images.shape[-2:]))]
    betas = tuple(b / sum(betas) for b in betas)
    scores = []
    for start in range(0, pairs, batch):
        a = images[first[start:start + batch]].float()
        b = images[second[start:start + batch]].float()
        scores.append(multiscale_structural_similarity_index_measure(
            a, b, data_range=255.0, kernel_size=KERNEL, betas=betas, reduction="none", normalize="relu"))
    return float(torch.cat(scores).mean())
