"""Fidelity and diversity beyond FID, on features (dgan.metrics.features):

* precision and recall (Kynkäänniemi et al. 2019): torch-fidelity 0.4's own implementation (`prc`),
  k = 3 neighbours. Precision: the share of samples inside the real manifold (k-NN balls of the real
  features); recall: the share of real images inside the samples' manifold.
* density and coverage (Naeem et al. 2020, arXiv 2002.09797), k = 5 as in the paper. Density: how
  many real k-NN balls a sample falls into, over k (about 1 for samples like the reals; above 1 when
  samples crowd where reals are dense). Coverage: the share of real images whose k-NN ball holds at
  least one sample; unlike recall it is robust to outlying samples. Implemented here, in chunks,
  rather than with the authors' `prdc` package: prdc builds the full N x M distance matrices at once
  (sklearn), which is what the memory bound for large sets forbids; these are ten lines on the same
  chunked neighbour search the memorization audit uses.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dgan.metrics.neighbours import CHUNK, kth_neighbour_radius

PRC_NEIGHBOURS = 3       # torch-fidelity's default
DC_NEIGHBOURS = 5        # Naeem et al.


def precision_recall(real: Tensor, fake: Tensor, k: int = PRC_NEIGHBOURS) -> dict[str, float]:
    """{"precision", "recall"} of `fake` against `real` (N x D features each)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    # torch-fidelity's convention: features_1 are the generated ones.
    out = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k, prc_batch_size=CHUNK,
                                 save_cpu_ram=True, verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}


def density_coverage(real: Tensor, fake: Tensor, k: int = DC_NEIGHBOURS, chunk: int = CHUNK) -> dict[str, float]:
    """{"density", "coverage"} of `fake` against `real` (N x D features each)."""
    real, fake = real.float(), fake.float()
    radii = kth_neighbour_radius(real, k, chunk)
    balls_per_fake = torch.zeros(fake.shape[0])
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for f0 in range(0, fake.shape[0], chunk):
        f = fake[f0:f0 + chunk]
        for r0 in range(0, real.shape[0], chunk):
            inside = torch.cdist(f, real[r0:r0 + chunk]) < radii[r0:r0 + chunk]
            balls_per_fake[f0:f0 + f.shape[0]] += inside.sum(dim=1)
            covered[r0:r0 + chunk] |= inside.any(dim=0)
    return {"density": float(balls_per_fake.sum() / (k * fake.shape[0])), "coverage": float(covered.float().mean())}
