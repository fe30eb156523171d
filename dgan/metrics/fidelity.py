"""FID and KID through torch-fidelity (Inception or a TorchScript extractor), PSNR/SSIM through
torchmetrics, and the helpers the other metric modules share. See dgan/metrics/__init__.py."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from dgan.errors import MetricError
from dgan.runinfo import file_sha256

INCEPTION = "inception-v3-compat"
KID_MAX_SUBSET_SIZE = 1000
KID_SUBSETS = 100  # torch-fidelity's default
_FEATURE_LAYER = "features"
_CACHE_KEY_PATTERN = re.compile(r"[A-Za-z0-9._]+")


# --------------------------------------------------------------------------------------------------
# Inception weights: found locally or refused, never downloaded
# --------------------------------------------------------------------------------------------------


def inception_weights_url() -> str:
    """The URL torch-fidelity downloads its InceptionV3 weights from."""
    # Read from the installed torch-fidelity so that an upgrade that moves the file is followed.
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_weights_cache_path() -> Path:
    """Where torch hub would store the weights: ``$TORCH_HOME/hub/checkpoints/<file name from URL>``."""
    file_name = os.path.basename(urlparse(inception_weights_url()).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def resolve_inception_weights(fid_weights: str | os.PathLike[str] | None = None) -> Path:
    """Return the Inception weights file to use, or raise MetricError saying how to get it.

    ``fid_weights`` wins when given; otherwise the torch hub cache is looked at. Nothing is downloaded,
    so callers can run this before a long sample generation to fail early.
    """
    url = inception_weights_url()
    if fid_weights is not None:
        path = Path(fid_weights).expanduser()
        if not path.is_file():
            raise MetricError(f"Inception weights not found at --fid-weights {path}; download them from {url}")
        return path
    cached = inception_weights_cache_path()
    if cached.is_file():
        return cached
    raise MetricError(
        f"FID Inception weights {cached.name} not found (offline, nothing is downloaded): "
        f"download {url} into {cached.parent}/ or pass --fid-weights PATH"
    )


# --------------------------------------------------------------------------------------------------
# torch-fidelity plumbing
# --------------------------------------------------------------------------------------------------


class _ImageSet(Dataset):
    """Yields uint8 C x H x W tensors, as torch-fidelity requires of Dataset inputs."""

    def __init__(self, images: Tensor, gray_to_rgb: bool) -> None:
        self.images = images.detach().cpu()
        self.gray_to_rgb = gray_to_rgb

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        image = self.images[index]
        if self.gray_to_rgb and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image


def first_line(err: Exception) -> str:
    """An exception as one line for a MetricError (library messages can span many)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_scripted(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in recent torch, but it is the extractor format of the CLI.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as err:
        raise MetricError(f"cannot load TorchScript feature extractor {path}: {first_line(err)}") from err
    return module.eval()


class _TorchScriptExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a TorchScript module (uint8 N x C x H x W -> N x D).

    torch-fidelity builds extractors from the registry with all calculate_metrics kwargs, so the file
    path arrives as ``feature_extractor_weights_path``; the registered name carries the file's hash.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise MetricError(f"feature extractor {name} needs the TorchScript file path")
        self.net = load_scripted(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (_FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return _FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        features = self.net(x)
        if not torch.is_tensor(features) or features.dim() != 2 or features.shape[0] != x.shape[0]:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise MetricError(f"feature extractor {self.name} returned {shape}, expected (N={x.shape[0]}, D)")
        return (features.to(torch.float32),)


def _register_torchscript(path: str | os.PathLike[str]) -> str:
    """Register the file as a torch-fidelity extractor; return its name (stable per file content)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    file = Path(path).expanduser()
    if not file.is_file():
        raise MetricError(f"feature extractor file not found: {file}")
    name = f"dgan-torchscript-{file_sha256(file)[:16]}"
    # torch-fidelity's registry refuses a second registration; the same name means the same bytes.
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, _TorchScriptExtractor)
    return name


def resolve_extractor(
    extractor: str, extractor_path: str | os.PathLike[str] | None, fid_weights: str | os.PathLike[str] | None
) -> tuple[str, Path, bool]:
    """Return (registered name, file torch-fidelity should load, replicate gray to RGB)."""
    if extractor_path is not None:
        return _register_torchscript(extractor_path), Path(extractor_path).expanduser(), False
    if extractor != INCEPTION:
        # Other torch-fidelity extractors (CLIP, DINOv2, VGG) would download weights at run time.
        raise MetricError(f"unsupported extractor {extractor!r}: use {INCEPTION!r} or a TorchScript extractor_path")
    return INCEPTION, resolve_inception_weights(fid_weights), True


def check_images(images: Tensor, role: str, rgb_only: bool) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise MetricError(f"{role} images must be a uint8 N x C x H x W tensor, got {got}")
    if images.shape[0] < 2:
        raise MetricError(f"{role} images: need at least 2 images, got {images.shape[0]}")
    if rgb_only and images.shape[1] not in (1, 3):
        raise MetricError(f"{role} images: Inception takes 1 or 3 channels, got {images.shape[1]}")


def _kid_options(requested: int | None, num_real: int, num_fake: int) -> dict[str, int]:
    """KID subset size (default min(1000, N), N the smaller set) and number of subsets."""
    num_images = min(num_real, num_fake)
    size = min(KID_MAX_SUBSET_SIZE, num_images) if requested is None else requested
    if not 2 <= size <= num_images:
        raise MetricError(f"kid_subset_size must be in [2, {num_images}] (the smaller set size), got {size}")
    # When a subset is the whole of both sets, every draw is the same: one draw gives the same mean
    # (and kid_std 0) at 1/100 of the cost.
    subsets = 1 if size == num_real == num_fake else KID_SUBSETS
    return {"kid_subset_size": size, "kid_subsets": subsets}


def _cache_kwargs(real: Tensor, cache_dir: str | os.PathLike[str] | None, real_cache_key: str | None) -> dict:
    """torch-fidelity kwargs that cache input1 (the reference) only, or disable caching altogether."""
    if cache_dir is None or real_cache_key is None:
        # Without both, nothing is cached: torch-fidelity would otherwise write under $TORCH_HOME.
        return {"cache": False}
    if not _CACHE_KEY_PATTERN.fullmatch(real_cache_key):
        raise MetricError(f"real_cache_key {real_cache_key!r} may only hold letters, digits, '.' and '_'")
    n, c, h, w = real.shape
    content = hashlib.blake2b(real.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).hexdigest()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return {
        "cache": True,
        "cache_root": str(cache_dir),
        # torch-fidelity appends the extractor name and the feature layer to this name.
        "input1_cache_name": f"{real_cache_key}-{c}x{h}x{w}-n{n}-{content}",
    }


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    # torch-fidelity only knows cuda=True (the current device), so select the requested index here.
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# --------------------------------------------------------------------------------------------------
# Public metrics
# --------------------------------------------------------------------------------------------------


def fid_kid(
    real: Tensor,
    fake: Tensor,
    *,
    extractor: str = INCEPTION,
    extractor_path: str | os.PathLike[str] | None = None,
    fid_weights: str | os.PathLike[str] | None = None,
    kid_subset_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    real_cache_key: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    fid: bool = True,
    kid: bool = True,
) -> dict[str, float]:
    """FID and/or KID between ``real`` (the reference) and ``fake``, both uint8 N x C x H x W.

    Returns ``{"fid", "kid", "kid_std"}``, restricted to the requested metrics. ``extractor_path`` (a
    TorchScript file) takes precedence over ``extractor``. See the module docstring for the extractor,
    cache and KID-subset rules. Raises MetricError on bad inputs or missing weights.
    """
    if not (fid or kid):
        raise MetricError("nothing to compute: both fid and kid are False")
    name, weights, gray_to_rgb = resolve_extractor(extractor, extractor_path, fid_weights)
    check_images(real, "real", rgb_only=gray_to_rgb)
    check_images(fake, "fake", rgb_only=gray_to_rgb)
    device = torch.device(device)
    options = {
        "input1": _ImageSet(real, gray_to_rgb),
        "input2": _ImageSet(fake, gray_to_rgb),
        "fid": fid,
        "kid": kid,
        "feature_extractor": name,
        # Always a path: torch-fidelity downloads Inception weights when this is None.
        "feature_extractor_weights_path": str(weights),
        "batch_size": batch_size,
        "cuda": device.type == "cuda",
        # Images are in-memory tensors: DataLoader workers would only add start-up and copying cost.
        "save_cpu_ram": True,
        "verbose": False,
        **_cache_kwargs(real, cache_dir, real_cache_key),
    }
    if kid:
        options.update(_kid_options(kid_subset_size, real.shape[0], fake.shape[0]))
    try:
        with _on_device(device):
            raw = torch_fidelity.calculate_metrics(**options)
    except ValueError as err:  # torch-fidelity reports input problems as ValueError
        raise MetricError(f"torch-fidelity: {err}") from err
    out: dict[str, float] = {}
    if fid:
        out["fid"] = float(raw[torch_fidelity.KEY_METRIC_FID])
    if kid:
        out["kid"] = float(raw[torch_fidelity.KEY_METRIC_KID_MEAN])
        out["kid_std"] = float(raw[torch_fidelity.KEY_METRIC_KID_STD])
    return out


def psnr_ssim(pred: Tensor, target: Tensor, data_range: float = 2.0) -> dict[str, float]:
    """Mean over images of per-image PSNR (dB) and SSIM; pred and target are N x C x H x W.

    ``data_range`` is max - min of the pixel scale (2.0 for [-1, 1], 255 for uint8). Values are not
    clipped to the range. PSNR is computed per image and then averaged (not from the pooled MSE), so
    one identical pair makes the mean ``inf``. SSIM uses torchmetrics' defaults: an 11 x 11 Gaussian
    window with sigma 1.5, so images need H, W >= 11.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if pred.shape != target.shape or pred.dim() != 4:
        shapes = f"{tuple(pred.shape)} and {tuple(target.shape)}"
        raise MetricError(f"pred and target must be equal N x C x H x W shapes, got {shapes}")
    if min(pred.shape[-2:]) < 11:
        raise MetricError(f"SSIM needs images of at least 11 x 11 pixels, got {tuple(pred.shape[-2:])}")
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    pred, target = pred.to(dtype), target.to(dtype)
    psnr = peak_signal_noise_ratio(pred, target, data_range=data_range, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, target, data_range=data_range, reduction="none")
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
