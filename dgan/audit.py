"""The synthetic-data audit of one evaluation's samples (README, "Is my synthetic data safe and
useful?"): fidelity and diversity beyond FID, the memorization audit, and downstream utility.

    --prdc          precision, recall (torch-fidelity), density, coverage; in the FID feature space
    --memorization  each sample's distance to its nearest training image vs held-out real images'
    --diversity     MS-SSIM between random sample pairs (lower = more diverse)
    --utility       train a classifier on generated images per class, test it on held-out real ones

Every metric comes with its real-data floor, computed the same way on real images only (keys
real_*): the two halves of the held-out set for precision/recall/density/coverage, held-out pairs
for MS-SSIM, half of the held-out set scored against the other half's baseline for memorization,
and a classifier trained on real training images for utility (utility_real_*).
Rank 0 only, after the samples are gathered; numbers reach every rank through scoring's broadcast.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dgan.errors import EvalError

AUDIT_METRICS = ("prdc", "memorization", "diversity", "utility")
DEFAULT_UTILITY_PER_CLASS = 500
MIN_BASELINE_IMAGES = 200  # held-out images: 100 for a 1% quantile, twice for the floor on two halves


def check_audit_request(chosen: set[str], cfg, reference: str, num_samples: int, utility_per_class: int) -> None:
    """Fail before any sampling on what the run cannot give (called on every rank: cheap, no data read)."""
    k = cfg.model.num_classes
    if "utility" in chosen and k < 2:
        raise EvalError(f"--utility trains a classifier per class on generated images: it needs a class-conditional "
                        f"model (model.num_classes >= 2), and this one has {k}")
    if "utility" in chosen and num_samples < k * utility_per_class:
        raise EvalError(f"--utility needs {utility_per_class} samples per class: raise --num-samples to at least "
                        f"{k * utility_per_class} or lower --utility-per-class")
    if chosen & {"memorization", "utility"} and reference != "val":
        raise EvalError("--memorization and --utility judge against held-out real images, never trained on: "
                        "use --reference val, not train")


def check_utility_data(train_labels: Tensor, num_classes: int, per_class: int) -> None:
    """Rank 0, once the training labels are loaded and before any sampling: enough real images per class."""
    counts = torch.bincount(train_labels.long().flatten(), minlength=num_classes)[:num_classes]
    if int(counts.min()) < per_class:
        c = int(counts.argmin())
        raise EvalError(f"--utility: the training set has {int(counts[c])} images of class {c}, fewer than the "
                        f"{per_class} per class asked; use --utility-per-class {int(counts[c])} or less")


def _split_halves(x: Tensor) -> tuple[Tensor, Tensor]:
    half = x.shape[0] // 2
    return x[:half], x[half:2 * half]


def fidelity_scores(real_f: Tensor, fake_f: Tensor) -> dict[str, float]:
    from dgan.metrics import density_coverage, precision_recall  # torch-fidelity: slow to import

    out = {**precision_recall(real_f, fake_f), **density_coverage(real_f, fake_f)}
    a, b = _split_halves(real_f)
    out.update({f"real_{k}": v for k, v in {**precision_recall(a, b), **density_coverage(a, b)}.items()})
    return out


def memorization_scores(train_f, real_f, fake_f, train_u8, real_u8, fake_u8) -> tuple[dict[str, float], dict]:
    from dgan.metrics import closest_pairs, memorization_audit  # torch-fidelity: slow to import

    result = memorization_audit(train_f, real_f, fake_f, train_u8, real_u8, fake_u8)
    out = result.metrics()
    out["real_memorization_rate"] = result.floor_rate()  # held-out judged as if generated: about 1%
    extras = {"memorization_pairs": closest_pairs(result, fake_u8, train_u8),
              "memorization_fake_dist": result.fake_dist, "memorization_holdout_dist": result.holdout_dist,
              "memorization_threshold": result.threshold}
    return out, extras


def audit_scores(chosen: set[str], cfg, fake_u8: Tensor, real_u8: Tensor, real_labels: Tensor,
                 train_u8: Tensor | None, train_labels: Tensor | None, *, extractor_path=None, fid_weights=None,
                 device: torch.device, seed: int, utility_per_class: int) -> tuple[dict[str, float], dict[str, Any]]:
    """The chosen audit metrics (and their real_* floors), plus rank-0 artefacts for the report."""
    from dgan.metrics import (extract_features, ms_ssim_diversity,  # torch-fidelity: slow to import
                              train_synthetic_test_real)

    scores: dict[str, float] = {}
    extras: dict[str, Any] = {}

    def features(x: Tensor) -> Tensor:
        return extract_features(x, extractor_path=extractor_path, fid_weights=fid_weights, device=device)
    if chosen & {"prdc", "memorization"}:
        real_f, fake_f = features(real_u8), features(fake_u8)
        if "prdc" in chosen:
            scores.update(fidelity_scores(real_f, fake_f))
        if "memorization" in chosen:
            more, extras = memorization_scores(features(train_u8), real_f, fake_f, train_u8, real_u8, fake_u8)
            scores.update(more)
    if "diversity" in chosen:
        scores["ms_ssim"] = ms_ssim_diversity(fake_u8, seed=seed)
        scores["real_ms_ssim"] = ms_ssim_diversity(real_u8, seed=seed)
    if "utility" in chosen:
        k = cfg.model.num_classes
        fake_labels = torch.arange(fake_u8.shape[0]) % k  # sample i was generated for class i % K
        scores.update(train_synthetic_test_real(fake_u8, fake_labels, train_u8, train_labels, real_u8, real_labels,
                                                num_classes=k, per_class_n=utility_per_class, seed=seed))
    return scores, extras
