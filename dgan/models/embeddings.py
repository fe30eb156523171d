"""Timestep and class-label embeddings shared by the generator and the discriminator."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

MAX_PERIOD = 10000.0


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Transformer-style embedding of a batch of (integer or real) timesteps.

    Layout is ``[sin(t*f_0..f_{h-1}), cos(t*f_0..f_{h-1})]`` with
    ``f_i = MAX_PERIOD**(-i/h)`` and ``h = dim // 2``; an odd ``dim`` gets a
    trailing zero column so the output width is always exactly ``dim``.
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape [B], got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(MAX_PERIOD) * exponents)
    # float32 even under autocast: t*f reaches ~1000 rad, where fp16 loses the phase
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP: ``t [B] -> [B, dim]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))


class ClassEmbedding(nn.Module):
    """Learned label embedding with an extra "null" row for classifier-free guidance.

    Row ``num_classes`` is the unconditional label; ``y == -1`` maps onto it so
    that callers can drop labels per sample without knowing ``num_classes``.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def forward(self, y: Tensor) -> Tensor:
        y = torch.where(y == -1, torch.full_like(y, self.null_index), y)
        return self.embedding(y)

    def null_labels(self, batch_size: int, device: torch.device) -> Tensor:
        """A batch of unconditional labels (what ``y=None`` means to the models)."""
        return torch.full((batch_size,), self.null_index, dtype=torch.long, device=device)
