"""The memorization audit: does a generated image copy a training image?

For every generated image, the distance to its nearest training image, in the evaluation's feature
space and in pixel space. The same distance for held-out real images (never trained on) is the
baseline: it shows how close a *new* image of this data comes to the training set without being a
copy (held-out images identical to a training image are a leak in the split: they are counted
and left out of the baseline). The rule (after Somepalli et al. 2023, who also judge copies against the data's own
nearest-neighbour distances rather than a fixed threshold): a generated image is flagged when it is
closer to a training image than the 1st percentile of the held-out images' distances. A model that
does not copy gets about 1% flagged, by construction; one that copies gets many more. Carlini et
al. (arXiv 2301.13188) flag by a fixed pixel-distance ratio instead; the baseline rule needs no
threshold tuned per dataset, which is why it is the one used here. Pixel space catches exact and
near-exact copies that a feature extractor may map to a common region; features catch shifted or
re-contrasted copies that pixels miss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dgan.errors import MetricError
from dgan.metrics.neighbours import CHUNK, nearest

QUANTILE = 0.01  # the held-out distances' 1st percentile is the copy threshold


@dataclass
class MemorizationAudit:
    fake_dist: Tensor          # [M] feature distance of each sample to its nearest training image
    holdout_dist: Tensor       # [H'] the same for each held-out real image (duplicates of training images left out)
    fake_dist_px: Tensor       # [M] pixel-space distances
    holdout_dist_px: Tensor    # [H']
    nearest_train: Tensor      # [M] index of each sample's nearest training image (feature space)
    holdout_duplicates: int = 0  # held-out images identical to a training image: a leak, not a baseline

    @property
    def threshold(self) -> float:
        return float(torch.quantile(self.holdout_dist, QUANTILE))

    @property
    def threshold_px(self) -> float:
        return float(torch.quantile(self.holdout_dist_px, QUANTILE))

    def flagged(self) -> Tensor:
        """[M] bool: the sample is closer to a training image than the baseline allows, in either space."""
        return (self.fake_dist < self.threshold) | (self.fake_dist_px < self.threshold_px)

    def floor_rate(self) -> float:
        """The rule applied to real images that were never trained on: the first half of the held-out
        distances sets the thresholds, the second half is judged as if generated (about QUANTILE by
        construction). Reuses the distances already found: no second search of the training set."""
        half = self.holdout_dist.shape[0] // 2
        if half < int(1 / QUANTILE):
            raise MetricError(f"memorization: the real floor needs {2 * int(1 / QUANTILE)} new held-out images, "
                              f"got {self.holdout_dist.shape[0]}; hold out more images")
        thr = torch.quantile(self.holdout_dist[:half], QUANTILE)
        thr_px = torch.quantile(self.holdout_dist_px[:half], QUANTILE)
        judged = (self.holdout_dist[half:] < thr) | (self.holdout_dist_px[half:] < thr_px)
        return float(judged.float().mean())

    def metrics(self) -> dict[str, float]:
        """memorization_rate (either space), its feature- and pixel-space parts, and the median
        sample-to-train distance over the held-out one (about 1 without copying, << 1 with)."""
        return {"memorization_rate": float(self.flagged().float().mean()),
                "memorization_rate_features": float((self.fake_dist < self.threshold).float().mean()),
                "memorization_rate_pixels": float((self.fake_dist_px < self.threshold_px).float().mean()),
                "memorization_nn_ratio": float(self.fake_dist.median() / self.holdout_dist.median().clamp_min(1e-12)),
                "holdout_train_duplicates": float(self.holdout_duplicates)}


def audit(train_feats: Tensor, holdout_feats: Tensor, fake_feats: Tensor, train_u8: Tensor, holdout_u8: Tensor,
          fake_u8: Tensor, chunk: int = CHUNK) -> MemorizationAudit:
    """Nearest training image of every sample and every held-out image, in both spaces, in chunks.
    Pixel distances are Euclidean on the uint8 values (0-255 units), converted chunk by chunk, so the
    training images stay uint8 in memory."""
    fake_d, fake_i = nearest(fake_feats, train_feats, 1, chunk=chunk)
    holdout_d, _ = nearest(holdout_feats, train_feats, 1, chunk=chunk)
    fake_px, _ = nearest(fake_u8, train_u8, 1, chunk=chunk)
    holdout_px, _ = nearest(holdout_u8, train_u8, 1, chunk=chunk)
    # A held-out image identical to a training image (PneumoniaMNIST's val split has 7) is a leak in
    # the split, not an example of a new image: left in, it puts the 1% quantile at 0 and nothing
    # could ever be flagged. It is left out of the baseline and counted.
    new = holdout_px[:, 0] > 0
    if int(new.sum()) < int(1 / QUANTILE):
        raise MetricError(f"memorization: only {int(new.sum())} held-out images differ from every training image; "
                          f"the baseline's {QUANTILE:.0%} quantile needs {int(1 / QUANTILE)}")
    return MemorizationAudit(fake_d[:, 0], holdout_d[new, 0], fake_px[:, 0], holdout_px[new, 0], fake_i[:, 0],
                             holdout_duplicates=int((~new).sum()))


def closest_pairs(result: MemorizationAudit, fake_u8: Tensor, train_u8: Tensor, n: int = 16) -> Tensor:
    """uint8 [2n, C, H, W]: the n samples closest to a training image, each followed by that image
    (sample | nearest training image, pair after pair): the picture a person judges copies by."""
    order = result.fake_dist.argsort()[:n]
    pairs = torch.stack([fake_u8[order], train_u8[result.nearest_train[order]]], dim=1)
    return pairs.reshape(-1, *fake_u8.shape[1:])
