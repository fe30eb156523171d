"""Domain feature extractors: a tiny random one for tests, and one trained on the training images'
labels, both saved as TorchScript for dgan.metrics.fid_kid."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from dgan.atomic import write_atomic
from dgan.errors import MetricError

# --------------------------------------------------------------------------------------------------
# Domain feature extractors (TorchScript, uint8 in, features out)
# --------------------------------------------------------------------------------------------------


class _FeatureNet(nn.Module):
    """Small conv net: uint8 N x C x H x W -> float N x dim. Scriptable; any H x W (global pooling)."""

    def __init__(self, in_channels: int, dim: int, width: int = 16) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        # Normalisation lives inside so that the saved file is self-contained: uint8 in, features out.
        x = x.to(torch.float32) / 127.5 - 1.0
        channels = x.shape[1]
        if channels != self.in_channels:
            if self.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)  # RGB -> gray for a grayscale extractor
            elif channels == 1:
                x = x.expand([-1, self.in_channels, -1, -1])  # gray -> replicated channels
            else:
                raise RuntimeError("feature extractor: input channel count does not match the network")
        return self.trunk(x)


def _save_scripted(module: nn.Module, out_path: str | os.PathLike[str]) -> Path:
    """Script ``module`` in eval mode on CPU and write it atomically (readers never see a partial file)."""
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation, see load_scripted
        scripted = torch.jit.script(module.cpu().eval())
        return write_atomic(out, lambda f: torch.jit.save(scripted, f))


def build_tiny_extractor(
    out_path: str | os.PathLike[str], channels: int = 1, dim: int = 64, seed: int = 0
) -> Path:
    """Write a randomly initialised conv feature extractor as TorchScript; return its path.

    Random conv features still separate blur and noise from real images, which is enough for tests and
    for a quick relative comparison; use :func:`train_domain_extractor` for numbers worth reporting.
    The same seed gives the same weights. The cache key is a hash of the file, whose zip container
    also records when it was written, so a rebuilt file starts a new cache entry.
    """
    # fork_rng keeps the caller's global RNG stream untouched by the seeded initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _FeatureNet(channels, dim)
        for layer in net.modules():
            if isinstance(layer, nn.Conv2d):
                # He init keeps the activation scale through the ReLUs, so untrained features are O(1)
                # instead of shrinking layer by layer under PyTorch's default init.
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
    return _save_scripted(net, out_path)


def _train_epoch(
    model: nn.Sequential,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> dict[str, float]:
    model.train()
    order = torch.randperm(images.shape[0], generator=generator)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        logits = model(images[index])
        loss = nn.functional.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # .item() per batch is fine here: a CPU classifier, not the training step of the GAN.
        loss_sum += loss.item() * len(index)
        correct += int((logits.argmax(dim=1) == labels[index]).sum())
    return {"loss": loss_sum / len(order), "accuracy": correct / len(order)}


def fit_classifier(images: Tensor, labels: Tensor, *, dim: int = 128, epochs: int = 5, batch_size: int = 128,
                   lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Sequential, list[dict[str, float]]]:
    """Train the small CNN (_FeatureNet + a linear head) on uint8 ``images`` (N x C x H x W) and
    integer ``labels`` 0..K-1; return (model in eval mode, per-epoch training loss and accuracy).

    AdamW, lr 3e-3, weight decay 1e-4, seeded init and batch order: the same data give the same model.
    Cost: about 17 s per epoch for 2900 images of 28 x 28 on 2 CPU cores shared with other jobs.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise MetricError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
    labels = labels.reshape(-1).to(torch.int64)
    if labels.shape[0] != images.shape[0]:
        raise MetricError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if epochs < 1:
        raise MetricError(f"epochs must be >= 1, got {epochs}")
    num_classes = int(labels.max()) + 1
    if num_classes < 2 or int(labels.min()) < 0:
        raise MetricError(f"labels must be 0..K-1 with K >= 2, got min {int(labels.min())} max {num_classes - 1}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(_FeatureNet(images.shape[1], dim), nn.Linear(dim, num_classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    history = []
    for epoch in range(epochs):
        stats = _train_epoch(model, optimizer, images, labels, batch_size, generator)
        history.append({"epoch": float(epoch + 1), **stats})
    if not math.isfinite(history[-1]["loss"]):
        raise MetricError("classifier training diverged (non-finite loss)")
    return model.eval(), history


def train_domain_extractor(
    images: Tensor,
    labels: Tensor,
    out_path: str | os.PathLike[str],
    *,
    dim: int = 128,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[dict[str, float]]:
    """Train the small CNN classifier (:func:`fit_classifier`) on uint8 ``images`` and integer
    ``labels``; save its penultimate layer (global-pooled ``dim`` features) as a TorchScript extractor.

    The saved module takes uint8 input and normalises inside, like :func:`build_tiny_extractor`.
    Returns the per-epoch training ``loss`` and ``accuracy`` (there is no held-out split here; hold one
    out to judge the extractor, and never train it on the images it will score).
    """
    model, history = fit_classifier(images, labels, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr,
                                    seed=seed, device=device)
    _save_scripted(model[0], out_path)
    return history
