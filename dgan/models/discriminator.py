"""D: a PatchGAN conditioned on the Diffusion-GAN noise level tau (and optionally on y)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dgan.models.embeddings import TimeEmbedding

# Range the sinusoidal embedding is tuned for (DDPM-style integer timesteps).
_EMBED_STEPS = 1000
_MAX_CHANNEL_MULT = 8
_HEAD_KERNEL = 4


def _group_norm(num_channels: int) -> nn.GroupNorm:
    # Per-sample normalisation: unlike BatchNorm it keeps R1 (a per-sample
    # gradient penalty) well defined and DDP ranks independent of each other.
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels)


class PatchDiscriminator(nn.Module):
    """pix2pix-style PatchGAN: ``num_layers`` stride-2 4x4 convs, one stride-1 4x4 conv,
    then a 4x4 conv to a map of patch logits (2x2 at 32 px with 3 layers).

    tau conditioning is FiLM after every conv block. A projection term alone would
    only tilt the final score, but the noise level changes the statistics of the
    input from the first layer on (tau=0: clean edges; large tau: mostly noise),
    so letting every block rescale its features per tau is the better fit. FiLM is
    NOT zero-initialised here (unlike G): there is no plain model to match, and a
    tau-blind D at the start would only waste early steps.

    With ``num_classes > 0`` a projection term (Miyato & Koyama 2018) is added per
    patch: the mean over the head's 4x4 window of ``<embed(y), phi>``, so the class
    term and the head look at the same features. ``y=None`` or ``y == -1`` (per
    sample) gives no class term.

    ``in_channels`` (default ``channels``) lets a conditional D take more than the image:
    for super-resolution the step concatenates the upsampled LR image, so D judges
    whether an HR image fits its LR, not only whether it looks real.
    """

    def __init__(
        self,
        channels: int = 1,
        base_channels: int = 64,
        num_layers: int = 3,
        time_dim: int = 128,
        num_classes: int = 0,
        num_steps: int = 1000,
        in_channels: int | None = None,
        condition_on_t: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_steps = num_steps
        widths = [base_channels * min(2**i, _MAX_CHANNEL_MULT) for i in range(num_layers + 1)]
        strides = [2] * num_layers + [1]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.film = nn.ModuleList()
        in_width = channels if in_channels is None else in_channels
        for index, (width, stride) in enumerate(zip(widths, strides)):
            has_norm = index > 0  # pix2pix: no norm on raw pixels
            self.convs.append(nn.Conv2d(in_width, width, 4, stride, 1, bias=not has_norm))
            self.norms.append(_group_norm(width) if has_norm else nn.Identity())
            self.film.append(nn.Linear(time_dim, 2 * width))
            in_width = width
        self.head = nn.Conv2d(in_width, 1, _HEAD_KERNEL, 1, 1)
        self.tau_embed = TimeEmbedding(time_dim)
        # the diffusion step t of the x_t that D sees beside the image (gan.d_sees_xt), if any
        self.t_embed = TimeEmbedding(time_dim) if condition_on_t else None
        self.class_proj = None
        if num_classes > 0:
            self.class_proj = nn.Embedding(num_classes, in_width)
            # ~unit-variance inner product for unit-variance features
            nn.init.normal_(self.class_proj.weight, std=in_width**-0.5)

    def _class_term(self, features: Tensor, y: Tensor) -> Tensor:
        assert self.class_proj is not None
        labelled = (y >= 0).to(features.dtype)[:, None]
        embedding = self.class_proj(y.clamp(min=0)) * labelled
        inner = (features * embedding[:, :, None, None]).sum(dim=1, keepdim=True)
        # Same window/padding as the head conv so the maps line up patch for patch.
        return F.avg_pool2d(inner, _HEAD_KERNEL, stride=1, padding=1)

    def forward(self, x: Tensor, tau: Tensor, y: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        # Rescale so the sinusoid sees the 0..1000 range it separates well,
        # whatever the number of noise steps.
        scale = _EMBED_STEPS / self.num_steps
        emb = self.tau_embed(tau.to(torch.float32) * scale)
        if (t is None) != (self.t_embed is None):
            raise ValueError("t must be given exactly when the discriminator was built with condition_on_t=True")
        if self.t_embed is not None:
            emb = emb + self.t_embed(t.to(torch.float32) * scale)
        act = F.silu(emb)
        h = x
        for conv, norm, film in zip(self.convs, self.norms, self.film):
            gamma, beta = film(act)[:, :, None, None].chunk(2, dim=1)
            h = norm(conv(h)) * (1 + gamma) + beta
            h = F.leaky_relu(h, 0.2)
        logits = self.head(h)
        if y is not None:
            if self.class_proj is None:
                raise ValueError("y given but the discriminator was built with num_classes=0")
            logits = logits + self._class_term(h, y)
        return logits
