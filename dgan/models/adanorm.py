"""Norm layers for the generator: GroupNorm in place of smp's BatchNorm, optionally (t, y)-adaptive.

Why adaptive: a diffusion network must behave differently at every noise level, and standard
diffusion UNets condition every block on t. smp's UNet++ has no place to inject t, but every
one of its blocks has a norm layer, so making each norm's scale and shift depend on (t, y)
reaches every encoder and decoder block without touching smp's code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

MAX_GROUPS = 32
MIN_GROUP_CHANNELS = 4


def num_groups(num_channels: int) -> int:
    """Up to 32 groups, but at least 4 channels per group.

    Why the floor: a group of 1-2 channels is an instance norm. It removes each channel's
    mean over the image, which is the very place where global intensity (and a FiLM shift
    applied before it) lives; the 16-channel decoder stages at 32 px had exactly that.
    """
    groups = math.gcd(MAX_GROUPS, max(1, num_channels // MIN_GROUP_CHANNELS))
    return groups if num_channels % groups == 0 else 1


class NormCondition:
    """The (t, y) modulation for one forward pass, shared by all AdaGroupNorm layers of a G.

    A plain object, not a module: G computes every layer's scale and shift in one matmul
    (one kernel rather than one per norm layer), stores them here for the forward, and each
    layer reads its own slice. smp's modules then need no extra forward argument.
    """

    def __init__(self) -> None:
        self.width = 0                    # total 2*C over the registered layers
        self.mod: Optional[Tensor] = None  # [B, width] during G's forward, else None

    def register(self, num_channels: int) -> int:
        offset = self.width
        self.width += 2 * num_channels
        return offset


class AdaGroupNorm(nn.GroupNorm):
    """GroupNorm, then ``h * (1 + gamma(t, y)) + beta(t, y)`` per channel.

    A GroupNorm subclass, so state-dict keys stay ``weight``/``bias`` and pretrained encoder
    files load as before. Outside G's forward (``cond.mod is None``, e.g. while the encoder is
    probed at build time) it is a plain GroupNorm.
    """

    def __init__(self, groups: int, num_channels: int, eps: float, cond: NormCondition) -> None:
        super().__init__(groups, num_channels, eps=eps, affine=True)
        self.cond = cond
        self.offset = cond.register(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = super().forward(x)
        mod = self.cond.mod
        if mod is None:
            return h
        c = self.num_channels
        gamma = mod[:, self.offset:self.offset + c, None, None]
        beta = mod[:, self.offset + c:self.offset + 2 * c, None, None]
        return torch.addcmul(h + beta, h, gamma.to(h.dtype))


def batchnorm_to_groupnorm(module: nn.Module, cond: Optional[NormCondition] = None) -> int:
    """Replace every BatchNorm2d below `module` by a GroupNorm with the same affine params.

    Why: smp's encoders and decoder use BatchNorm, which is a poor fit for a noise predictor.
    - Its output depends on the rest of the batch, whose samples sit at unrelated noise levels.
    - Running statistics differ per DDP rank, and train mode behaves differently from eval mode.
    - A non-finite batch poisons the running stats for good, even when the optimizer skips the
      step (they are buffers, not parameters).
    GroupNorm is per-sample and has no buffers. Pretrained affine weights carry over; the
    running statistics are dropped, and fine-tuning adapts to that. With `cond`, every
    replacement is an AdaGroupNorm reading its modulation from it.
    Returns the number of layers replaced.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            if cond is None:
                gn = nn.GroupNorm(num_groups(c), c, eps=child.eps, affine=True)
            else:
                gn = AdaGroupNorm(num_groups(c), c, child.eps, cond)
            if child.affine:
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
            setattr(module, name, gn)
            count += 1
        else:
            count += batchnorm_to_groupnorm(child, cond)
    return count
