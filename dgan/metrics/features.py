"""Image features in the space FID uses (torch-fidelity's Inception, or a TorchScript domain
extractor), for the metrics that work on the features themselves: precision/recall, density and
coverage, and the memorization audit. Same extractor, same layer as FID, so all numbers of one
evaluation live in one feature space."""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from dgan.metrics.fidelity import INCEPTION, check_images, resolve_extractor


@torch.no_grad()
def extract_features(images: Tensor, *, extractor_path: str | os.PathLike[str] | None = None,
                     fid_weights: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu",
                     batch_size: int = 256) -> Tensor:
    """float32 N x D features of uint8 N x C x H x W images, in batches (the images stay where they are)."""
    name, weights, gray_to_rgb = resolve_extractor(INCEPTION, extractor_path, fid_weights)
    check_images(images, "images", rgb_only=gray_to_rgb)
    device = torch.device(device)
    layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    net = create_feature_extractor(name, [layer], cuda=False, feature_extractor_weights_path=str(weights),
                                   verbose=False).to(device)
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device)
        if gray_to_rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # Inception takes RGB; a gray X-ray is the same in all three
        out.append(net(x)[0].float().cpu())
    return torch.cat(out)
