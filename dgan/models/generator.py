"""G: a UNet++ that predicts eps or v, conditioned on (t, y) by FiLM and optionally by every GroupNorm."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from dgan.errors import DganError
from dgan.models.adanorm import NormCondition, batchnorm_to_groupnorm, num_groups
from dgan.models.embeddings import ClassEmbedding, TimeEmbedding


class EncoderWeightsError(DganError, RuntimeError):
    """Pretrained encoder weights could not be obtained or do not fit the encoder."""


def _build_unet(
    encoder: str,
    encoder_weights: str | None,
    encoder_depth: int,
    decoder_channels: Sequence[int],
    in_channels: int,
    out_channels: int,
) -> nn.Module:
    # Imported here: smp pulls in timm (about a second), and the CLIs check their arguments, and
    # evaluation its weights files, before any model is built.
    import segmentation_models_pytorch as smp

    try:
        return smp.UnetPlusPlus(
            encoder_name=encoder,
            encoder_weights=encoder_weights,
            encoder_depth=encoder_depth,
            decoder_channels=tuple(decoder_channels),
            in_channels=in_channels,
            classes=out_channels,
        )
    except OSError as err:
        # Only a hub download raises OSError here (LocalEntryNotFoundError,
        # connection errors); with HF_HUB_OFFLINE=1 it comes within seconds.
        # `from None` keeps the message to the one actionable line.
        raise EncoderWeightsError(
            f"cannot download encoder_weights={encoder_weights!r} for encoder "
            f"'{encoder}' (offline? {type(err).__name__}). Either run once on a "
            "machine with internet and copy its Hugging Face cache "
            "(~/.cache/huggingface, or $HF_HOME) to this machine, or set "
            "model.encoder_weights_path=/path/to/encoder.pth (a state_dict of "
            "the encoder, e.g. torch.save(smp_model.encoder.state_dict(), path))"
        ) from None


def _adapt_first_conv(file_state: dict[str, Tensor], model_state: dict[str, Tensor]) -> None:
    """Fit a 3-channel (RGB) first conv to the model's input channels, in place.

    Same rule as smp uses for its own pretrained weights: 1 channel gets the sum
    over RGB (a grey image then activates the filter as the RGB image of the same
    intensity did); any other count cycles the RGB filters and rescales by
    3/in_channels so the expected activation magnitude is unchanged.
    """
    for key, weight in file_state.items():
        target = model_state.get(key)
        if target is None or weight.dim() != 4 or target.dim() != 4:
            continue
        same_elsewhere = weight.shape[0] == target.shape[0] and weight.shape[2:] == target.shape[2:]
        if weight.shape[1] != 3 or target.shape[1] == 3 or not same_elsewhere:
            continue
        in_channels = target.shape[1]
        if in_channels == 1:
            file_state[key] = weight.sum(dim=1, keepdim=True)
        else:
            index = torch.arange(in_channels) % 3
            file_state[key] = weight[:, index] * (3.0 / in_channels)


def _describe_mismatch(file_state: dict[str, Tensor], model_state: dict[str, Tensor]) -> str:
    missing = sorted(set(model_state) - set(file_state))
    unexpected = sorted(set(file_state) - set(model_state))
    shapes = [
        f"{k}: file {tuple(file_state[k].shape)} vs encoder {tuple(model_state[k].shape)}"
        for k in sorted(set(file_state) & set(model_state))
        if file_state[k].shape != model_state[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {'; '.join(items[:3])})")
    return ", ".join(parts) or "unknown mismatch"


def load_encoder_weights(encoder: nn.Module, path: str | Path, encoder_name: str) -> None:
    """Load an encoder state_dict file strictly, adapting an RGB first conv if needed."""
    path = Path(path)
    if not path.is_file():
        raise EncoderWeightsError(f"encoder_weights_path {path} does not exist")
    try:
        file_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors have no common base class
        raise EncoderWeightsError(f"cannot read encoder weights {path}: {err}") from err
    if not isinstance(file_state, dict):
        raise EncoderWeightsError(f"{path} holds a {type(file_state).__name__}, not a state_dict")
    # Classifier heads of full torchvision/timm backbones are not part of the encoder.
    file_state = {k: v for k, v in file_state.items() if not k.startswith("fc.")}
    model_state = encoder.state_dict()
    # A BatchNorm file (e.g. ImageNet weights) loads into a GroupNorm encoder: the affine
    # weights carry over, the running statistics have nowhere to go and are dropped.
    bn_buffers = ("running_mean", "running_var", "num_batches_tracked")
    file_state = {k: v for k, v in file_state.items()
                  if k in model_state or not k.endswith(bn_buffers)}
    _adapt_first_conv(file_state, model_state)
    try:
        encoder.load_state_dict(file_state, strict=True)
    except RuntimeError:
        detail = _describe_mismatch(file_state, model_state)
        raise EncoderWeightsError(
            f"encoder weights {path} do not fit encoder '{encoder_name}': {detail}"
        ) from None


def _freeze_unused_params(encoder: nn.Module, size_px: int) -> list[str]:
    """Freeze encoder parameters that the forward never touches; return their names.

    smp keeps every backbone stage even when encoder_depth < 5 (e.g. layer4 of a
    ResNet at depth 4). Left trainable, those never get a gradient, which makes
    DDP demand find_unused_parameters=True. Kept (not deleted) so encoder state
    dicts stay loadable from full-backbone files.
    """
    was_training = encoder.training
    encoder.eval()  # eval: the probe must not move BatchNorm running statistics
    try:
        probe = torch.zeros(1, encoder.out_channels[0], size_px, size_px)
        features = encoder(probe)
        total = sum(f.sum() for f in features[1:])
        named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        encoder.train(was_training)
    unused = [name for (name, param), grad in zip(named, grads) if grad is None]
    for (name, param), grad in zip(named, grads):
        if grad is None:
            param.requires_grad_(False)
    return unused


class FullResRefine(nn.Module):
    """A full-resolution path from the input to the output, conditioned on t.

    Why: smp's UNet++ decoder drops encoder stage 0 (the input itself), and a ResNet stem
    downsamples 4x before its first block. At small t, eps is pixel-level noise that G must
    reproduce exactly, and nothing at full resolution carries it to the output: the
    diffusion loss then plateaus high. This block sees [decoder output, x_t] at full
    resolution. Its last conv is zero-initialised, so at init G is still the plain UNet++.
    """

    def __init__(self, decoder_channels: int, in_channels: int, out_channels: int, time_dim: int,
                 width: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(decoder_channels + in_channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(num_groups(width), width)
        self.film = nn.Linear(time_dim, 2 * width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, decoded: Tensor, x_in: Tensor, act: Tensor) -> Tensor:
        h = self.norm(self.conv_in(torch.cat([decoded, x_in], dim=1)))
        gamma, beta = self.film(act)[:, :, None, None].chunk(2, dim=1)
        return self.conv_out(nn.functional.silu(h * (1 + gamma) + beta))


class Generator(nn.Module):
    """``out = G(x_t, t[, y][, cond])`` (eps or v) built on a segmentation_models_pytorch UNet++.

    Conditioning on (t, y):
    - ``norm_conditioning`` (the default): every GroupNorm of the UNet++, encoder and decoder,
      is an AdaGroupNorm whose scale and shift come from one zero-initialised
      ``Linear(time_dim -> sum 2C)`` (see models/adanorm.py), so every block knows t.
    - always: one zero-initialised FiLM ``Linear(time_dim -> 2C)`` per encoder feature map
      that the decoder consumes (stages 1..encoder_depth). Stage 0 is the raw input, which
      smp's UNet++ decoder discards, so it gets no FiLM.

    Encoder weights: ``encoder_weights="imagenet"`` downloads through the Hugging
    Face hub and raises :class:`EncoderWeightsError` when that is impossible.
    ``encoder_weights_path`` (takes precedence) loads a local encoder state_dict
    strictly; an RGB first conv in the file is adapted to ``channels +
    cond_channels`` inputs the way smp adapts its own weights (see
    ``_adapt_first_conv``).
    """

    def __init__(
        self,
        channels: int = 1,
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_weights_path: str | Path | None = None,
        encoder_depth: int = 5,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        num_classes: int = 0,
        time_dim: int = 128,
        cond_channels: int = 0,
        norm: str = "group",
        norm_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if norm not in ("group", "batch"):
            raise ValueError(f"norm={norm!r}: use 'group' (default) or 'batch'")
        if norm_conditioning and norm != "group":
            raise ValueError("norm_conditioning modulates GroupNorm layers: it needs norm='group'")
        if encoder_weights_path is not None:
            # The local file is how offline clusters get e.g. ImageNet weights, so
            # it wins; encoder_weights then only names what the file holds.
            encoder_weights = None
        self.channels = channels
        self.cond_channels = cond_channels
        self.encoder_depth = encoder_depth
        self.num_classes = num_classes
        self.unet = _build_unet(
            encoder, encoder_weights, encoder_depth, decoder_channels,
            in_channels=channels + cond_channels, out_channels=channels,
        )
        self.norm_condition = NormCondition() if norm_conditioning else None
        if norm == "group":
            batchnorm_to_groupnorm(self.unet, self.norm_condition)
        if encoder_weights_path is not None:
            load_encoder_weights(self.unet.encoder, encoder_weights_path, encoder)
        self.frozen_encoder_params = _freeze_unused_params(self.unet.encoder, self.image_multiple)
        self.time_embed = TimeEmbedding(time_dim)
        self.class_embed = ClassEmbedding(num_classes, time_dim) if num_classes > 0 else None
        self.film = self._build_film(self.unet.encoder.out_channels, time_dim)
        self.norm_proj = None
        if self.norm_condition is not None:
            # zero init: at init every AdaGroupNorm is its plain GroupNorm
            self.norm_proj = nn.Linear(time_dim, self.norm_condition.width)
            nn.init.zeros_(self.norm_proj.weight)
            nn.init.zeros_(self.norm_proj.bias)
        self.refine = FullResRefine(decoder_channels[-1], channels + cond_channels, channels, time_dim)
        # smp < 0.5 decoders take the features as *args, 0.5+ as one list
        params = inspect.signature(self.unet.decoder.forward).parameters.values()
        self._decoder_takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in params)

    @classmethod
    def from_config(cls, m, encoder_weights: bool = True) -> "Generator":
        """The G a ModelConfig (cfg.model) describes: the one place that maps it. encoder_weights=False
        skips pretrained weights (a checkpoint's state dict will replace them anyway)."""
        return cls(channels=m.channels, encoder=m.encoder,
                   encoder_weights=m.encoder_weights if encoder_weights else None,
                   encoder_weights_path=m.encoder_weights_path if encoder_weights else None,
                   encoder_depth=m.encoder_depth, decoder_channels=tuple(m.decoder_channels),
                   num_classes=m.num_classes, time_dim=m.time_dim, cond_channels=m.cond_channels,
                   norm=m.norm, norm_conditioning=m.norm_conditioning)

    @staticmethod
    def _build_film(stage_channels: Sequence[int], time_dim: int) -> nn.ModuleDict:
        layers = {}
        for stage, num_channels in enumerate(stage_channels):
            # stage 0 is the input itself (dropped by the decoder); some encoders
            # also report empty (0-channel) dummy stages
            if stage == 0 or num_channels == 0:
                continue
            layer = nn.Linear(time_dim, 2 * num_channels)
            # zero init: gamma = beta = 0, so at init G is exactly the plain UNet++
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            layers[str(stage)] = layer
        return nn.ModuleDict(layers)

    @property
    def image_multiple(self) -> int:
        """Height and width must be multiples of this (one halving per encoder stage)."""
        return 2**self.encoder_depth

    def check_image_size(self, height_px: int, width_px: int) -> None:
        """Config-time check; forward does not re-check, to keep the step lean."""
        multiple = self.image_multiple
        if height_px % multiple or width_px % multiple:
            raise ValueError(
                f"image size {height_px}x{width_px} px must divide by {multiple} "
                f"(2**encoder_depth, encoder_depth={self.encoder_depth})"
            )

    def embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        """Joint (t, y) embedding [B, time_dim]; y=None means the null label."""
        emb = self.time_embed(t)
        if self.class_embed is not None:
            if y is None:
                y = self.class_embed.null_labels(t.shape[0], t.device)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("y given but the generator was built with num_classes=0")
        return emb

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        if self.cond_channels > 0:
            if cond is None:
                raise ValueError(f"generator expects cond with {self.cond_channels} channels")
            x_t = torch.cat([x_t, cond], dim=1)
        elif cond is not None:
            raise ValueError("cond given but the generator was built with cond_channels=0")
        # SiLU first: the embedding ends in a Linear, and FiLM of a purely
        # linear function of the embedding would waste the MLP's capacity
        act = nn.functional.silu(self.embed(t, y))
        if self.norm_proj is None:
            return self._unet_forward(x_t, act)
        self.norm_condition.mod = self.norm_proj(act)
        try:
            return self._unet_forward(x_t, act)
        finally:
            self.norm_condition.mod = None  # no stale batch outside this forward

    def _unet_forward(self, x_t: Tensor, act: Tensor) -> Tensor:
        features = list(self.unet.encoder(x_t))
        for key, layer in self.film.items():
            stage = int(key)
            gamma, beta = layer(act)[:, :, None, None].chunk(2, dim=1)
            features[stage] = features[stage] * (1 + gamma) + beta
        if self._decoder_takes_varargs:
            decoded = self.unet.decoder(*features)
        else:
            decoded = self.unet.decoder(features)
        return self.unet.segmentation_head(decoded) + self.refine(decoded, x_t, act)
