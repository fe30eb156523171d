"""Downstream utility, "train on synthetic, test on real" (TSTR): does a model trained on the
synthetic set work on real patients?

Two classifiers of the same kind (dgan.metrics.extractor.fit_classifier: a 3-layer CNN with global
pooling, about 25k parameters, AdamW, seeded) are trained, one on N generated images per class
(labelled with the class they were generated for) and one on N real training images per class.
Both are tested on held-out real images; the real-trained one is the ceiling the synthetic one is
read against. Balanced accuracy (the mean per-class recall, so a majority-class guess scores 1/K)
and AUROC (one-vs-rest, macro over classes) come from torchmetrics. At 32 px, 1000 images per
class and 10 epochs take well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

from dgan.errors import MetricError
from dgan.metrics.extractor import fit_classifier

EPOCHS = 10


def per_class(images: Tensor, labels: Tensor, n: int, num_classes: int, what: str) -> tuple[Tensor, Tensor]:
    """The first n images of each class 0..K-1; a class with fewer than n is an error."""
    keep = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()[:n]
        if idx.numel() < n:
            raise MetricError(f"utility: {what} has {idx.numel()} images of class {c}, fewer than the {n} per class "
                              "asked; lower --utility-per-class")
        keep.append(idx)
    idx = torch.cat(keep)
    return images[idx], labels[idx]


@torch.no_grad()
def _scores(model: torch.nn.Module, images: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    probs = torch.cat([model(chunk).softmax(dim=1) for chunk in images.split(512)])
    return {"balanced_accuracy": float(multiclass_accuracy(probs, labels, num_classes, average="macro")),
            "auroc": float(multiclass_auroc(probs, labels, num_classes, average="macro"))}


def train_synthetic_test_real(synthetic: Tensor, synthetic_labels: Tensor, real_train: Tensor,
                              real_train_labels: Tensor, real_test: Tensor, real_test_labels: Tensor, *,
                              num_classes: int, per_class_n: int, epochs: int = EPOCHS, seed: int = 0
                              ) -> dict[str, float]:
    """utility_{synthetic,real}_{balanced_accuracy,auroc}: uint8 images, int labels 0..K-1."""
    out: dict[str, float] = {}
    sets = {"synthetic": (synthetic, synthetic_labels), "real": (real_train, real_train_labels)}
    for name, (images, labels) in sets.items():
        x, y = per_class(images, labels.long(), per_class_n, num_classes, f"the {name} training set")
        model, _ = fit_classifier(x, y, epochs=epochs, seed=seed)
        for key, value in _scores(model, real_test, real_test_labels.long(), num_classes).items():
            out[f"utility_{name}_{key}"] = value
    return out
