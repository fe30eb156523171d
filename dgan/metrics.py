"""Image-quality metrics: FID/KID through torch-fidelity, PSNR/SSIM through torchmetrics.

This module is the metrics layer under ``python -m dgan.evaluate``. It never downloads anything.

FID and KID
    :func:`fid_kid` compares two uint8 image sets (N x C x H x W) with one of two feature extractors:

    * ``inception-v3-compat`` (default): torch-fidelity's TF-compatible InceptionV3. Grayscale is
      replicated to 3 channels; any H x W is accepted, because the network resizes to 299 x 299 itself.
      The weights file is read from ``fid_weights`` or from the torch hub cache
      (see :func:`resolve_inception_weights`); when neither exists a :class:`MetricError` is raised
      before torch-fidelity gets a chance to start a download.
    * a TorchScript file (``extractor_path``) mapping uint8 N x C x H x W to float N x D features. It is
      registered as a torch-fidelity feature extractor, named after a hash of the file's bytes, so the
      whole computation (and its cache) stays in torch-fidelity. Images are passed through unchanged:
      the scripted module owns its normalisation, its channel handling and any resizing. The modules
      written by :func:`build_tiny_extractor` and :func:`train_domain_extractor` normalise uint8 inside,
      accept 1 or C input channels, and pool globally, so they take any H x W.

    Inception features mean little on 28-32 px grayscale X-rays; for those, train a domain extractor
    with :func:`train_domain_extractor` and report which extractor a number came from.

    KID subsets default to ``min(1000, N)`` images, N being the smaller of the two set sizes, because
    torch-fidelity's fixed default of 1000 fails on the small sets used during training. 100 subsets
    are drawn, except when a subset is the whole of both sets: then all draws are identical, one is
    drawn, and ``kid_std`` is 0.

Reference-statistics cache
    With ``cache_dir`` and ``real_cache_key``, torch-fidelity caches the features and FID statistics of
    ``real`` in ``cache_dir``. The entry is keyed by the caller's key (e.g. a dataset manifest hash), the
    image shape and count, a digest of the image bytes, and the extractor (the TorchScript file's hash,
    or ``inception-v3-compat``), so a stale entry is never reused for different images. The cache
    files are pickles read with ``weights_only=False`` by torch-fidelity: keep ``cache_dir`` private.

PSNR and SSIM
    :func:`psnr_ssim` computes both per image and averages over images. PSNR of an identical pair is
    ``inf`` (no cap), so the mean is ``inf`` when any pair is identical.

FRD (optional, ``pip install -e ".[frd]"``)
    :func:`frd` is the Fréchet Radiomics Distance (arXiv 2412.01496) of the frd-score package: the
    Fréchet distance between distributions of PyRadiomics features (first-order, GLCM, GLRLM, GLSZM,
    NGTDM on the image and its wavelet bands), z-scored against the reference set, reported as
    log(d^2). It needs no weights file, only CPU time; it is not symmetric (``real`` is the reference).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import torch
import torch_fidelity
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from dgan.errors import DganError
from dgan.runinfo import file_sha256

INCEPTION = "inception-v3-compat"
KID_MAX_SUBSET_SIZE = 1000
KID_SUBSETS = 100  # torch-fidelity's default
_FEATURE_LAYER = "features"
_CACHE_KEY_PATTERN = re.compile(r"[A-Za-z0-9._]+")


class MetricError(DganError, RuntimeError):
    """A metric cannot be computed; the message is one line that says what to do."""


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


def _first_line(err: Exception) -> str:
    """An exception as one line for a MetricError (library messages can span many)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_scripted(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in recent torch, but it is the extractor format of the CLI.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as err:
        raise MetricError(f"cannot load TorchScript feature extractor {path}: {_first_line(err)}") from err
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
        self.net = _load_scripted(feature_extractor_weights_path)

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


def _resolve_extractor(
    extractor: str, extractor_path: str | os.PathLike[str] | None, fid_weights: str | os.PathLike[str] | None
) -> tuple[str, Path, bool]:
    """Return (registered name, file torch-fidelity should load, replicate gray to RGB)."""
    if extractor_path is not None:
        return _register_torchscript(extractor_path), Path(extractor_path).expanduser(), False
    if extractor != INCEPTION:
        # Other torch-fidelity extractors (CLIP, DINOv2, VGG) would download weights at run time.
        raise MetricError(f"unsupported extractor {extractor!r}: use {INCEPTION!r} or a TorchScript extractor_path")
    return INCEPTION, resolve_inception_weights(fid_weights), True


def _check_images(images: Tensor, role: str, rgb_only: bool) -> None:
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
    name, weights, gray_to_rgb = _resolve_extractor(extractor, extractor_path, fid_weights)
    _check_images(real, "real", rgb_only=gray_to_rgb)
    _check_images(fake, "fake", rgb_only=gray_to_rgb)
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


def to_uint8(x: Tensor) -> Tensor:
    """Map images in [-1, 1] to uint8 [0, 255]: scale, round to nearest, clamp out-of-range values."""
    if not torch.isfinite(x).all():
        # A NaN cast to uint8 is undefined; a diverged generator must be reported, not scored.
        raise MetricError("images contain NaN or inf; cannot convert to uint8")
    return ((x.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


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


# --------------------------------------------------------------------------------------------------
# FRD: Fréchet Radiomics Distance through frd-score (the optional `frd` extra)
# --------------------------------------------------------------------------------------------------

FRD_INSTALL = 'pip install -e ".[frd]"'
# ITU-R BT.601 luma, the weights of PIL's convert("L"): radiomics describes grey levels only.
_LUMA = (0.299, 0.587, 0.114)


def _import_frd_score() -> ModuleType:
    """The frd_score module, or MetricError with the install command when the extra is missing."""
    try:
        import frd_score

        # frd-score imports PyRadiomics lazily, inside its worker processes: import it here so that a
        # missing or broken install is one line now, not a worker traceback after the generation.
        import radiomics  # noqa: F401
    except ImportError as err:
        missing = err.name or str(err).splitlines()[0]
        raise MetricError(f"FRD needs the optional radiomics packages ({missing} is not importable): "
                          f"{FRD_INSTALL}") from err
    return frd_score


def require_frd() -> None:
    """Raise MetricError with the install command unless FRD can be computed (imports take ~2-3 s)."""
    _import_frd_score()


def _frd_gray(images: Tensor, role: str) -> list:
    """The grey-level uint8 H x W arrays of a uint8 N x C x H x W set (C 1 or 3), checked for FRD."""
    _check_images(images, role, rgb_only=False)
    if images.shape[1] not in (1, 3):
        raise MetricError(f"{role} images: FRD takes 1 (grey) or 3 (RGB) channels, got {images.shape[1]}")
    x = images.detach().cpu()
    if x.shape[1] == 3:
        luma = (x.to(torch.float32) * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        x = luma.round().clamp(0, 255).to(torch.uint8)
    flat = (x.amax(dim=(1, 2, 3)) == x.amin(dim=(1, 2, 3))).nonzero().flatten().tolist()
    if flat:
        # PyRadiomics z-normalises each image by its own std, so a one-grey-level image makes its
        # extraction crash. Dropping such images would score a collapsing generator on its few
        # non-flat samples and hide the collapse: refuse instead, as to_uint8 refuses NaN.
        raise MetricError(f"{role} images: {len(flat)} of {x.shape[0]} are a single grey level (first: index "
                          f"{flat[0]}); FRD's radiomics features are undefined for flat images")
    return list(x[:, 0].numpy())


def _write_pngs(images: list, folder: Path) -> list[str]:
    """8-bit grey PNGs (frd-score reads files only), named in set order; returns their paths."""
    from PIL import Image

    folder.mkdir()
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:06d}.png"
        Image.fromarray(image).save(path)  # a 2D uint8 array is an 8-bit grey ("L") image
        paths.append(str(path))
    return paths


def _usable_cpus() -> int:
    # The CPUs this process may run on (its SLURM allocation), not the node's count that frd-score's
    # own default (cpu_count() - 2) would start processes for.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _quiet_frd_score(package_dir: str) -> Iterator[None]:
    """Keep one frd-score call off the console and leave the process's logging and ITK threads as found.

    frd-score prints its result and logs through the root logger, whose module functions install a
    stderr handler for the rest of the process (basicConfig) when root has none; PyRadiomics warns,
    for every 2D image, that it skips the LoG filter (a 1-voxel-deep slice), which is expected here.
    The worker processes are forked inside this block, so they inherit all of it.
    """
    import SimpleITK as sitk

    root, radiomics_logger = logging.getLogger(), logging.getLogger("radiomics")
    handlers, radiomics_level = root.handlers[:], radiomics_logger.level
    itk_threads = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()

    def not_frd_score(record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(package_dir)

    if not root.handlers:
        root.addHandler(logging.NullHandler())  # a handler present: no basicConfig() side effect
    root.addFilter(not_frd_score)
    radiomics_logger.setLevel(logging.ERROR)
    # One ITK thread per worker process: on 32 px images thread start-up costs more than it saves, and
    # the workers already use every CPU.
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy/scipy noise on rank-deficient covariances
            yield
    finally:
        root.removeFilter(not_frd_score)
        root.handlers[:] = handlers
        radiomics_logger.setLevel(radiomics_level)
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(itk_threads)


def frd(real: Tensor, fake: Tensor, *, num_workers: int | None = None) -> float:
    """Fréchet Radiomics Distance (frd-score's FRDv1, arXiv 2412.01496) of ``fake`` from ``real``.

    Both are uint8 N x C x H x W, C 1 or 3 (RGB is scored on its luma), N >= 2. Lower is better. The
    value is log(d^2), so it can be negative (and -inf for identical statistics). ``real`` is the
    reference: features are z-scored with its statistics, so FRD is not symmetric. With ~400 features
    the covariances of a few hundred images are rank-deficient and FRD depends on N: compare values
    only between sets of equal sizes and resolution. Raises MetricError (with the install command)
    without the `frd` extra, and for flat (one grey level) images.

    How: the images go to 8-bit PNGs in a temporary directory (frd-score reads files only, and the
    directory is removed afterwards) and frd_score.compute_frd scores them with defaults on
    ``num_workers`` processes (default: the CPUs this process may use, at most one per image). The
    result is deterministic: features are computed per image, in set order, with no random step.
    Small images work: the v1 settings resample to 2-pixel spacing (32 px -> 16 px) and PyRadiomics
    skips the LoG filter for every 2D image, leaving 398 features, all finite for 4-64 px images of
    X-rays, phantoms, noise or two grey levels. NaN does appear after z-scoring, in the features
    that are constant over the reference (always the full-image mask's voxel count; with few images,
    maybe more): frd-score drops those columns, which we keep, since a feature without spread in the
    reference has no z-score and carries no distribution to compare. (frd-score would also drop an
    image with a NaN feature; none was seen.) Flat images are refused, see :func:`_frd_gray`.

    Cost at 28-32 px (both sets count): about 0.1 s per image on an idle core; 0.25 s per image on
    2 cores shared with other jobs (100 + 100 images: 51 s), plus 3-7 s to import PyRadiomics once.
    1000 samples against 1000 reference images: about 2-8 minutes on 2 cores.
    """
    frd_score = _import_frd_score()
    sets = [_frd_gray(real, "real"), _frd_gray(fake, "fake")]
    workers = num_workers or min(_usable_cpus(), len(sets[0]) + len(sets[1]))
    with tempfile.TemporaryDirectory(prefix="dgan-frd-") as tmp:
        paths = [_write_pngs(images, Path(tmp) / role) for images, role in zip(sets, ("real", "fake"))]
        try:
            with _quiet_frd_score(os.path.dirname(frd_score.__file__)):
                # File lists, not folders: the order is ours and nothing else in the folder is read.
                value = frd_score.compute_frd(paths, num_workers=workers)
        except (RuntimeError, ValueError) as err:
            raise MetricError(f"frd-score: {_first_line(err)}") from err
    return float(value)


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
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation, see _load_scripted
        scripted = torch.jit.script(module.cpu().eval())
        torch.jit.save(scripted, str(tmp))
    os.replace(tmp, out)
    return out


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
    """Train a small CNN classifier on uint8 ``images`` (N x C x H x W) and integer ``labels`` (N);
    save its penultimate layer (global-pooled ``dim`` features) as a TorchScript extractor.

    The saved module takes uint8 input and normalises inside, like :func:`build_tiny_extractor`.
    Cost: about 17 s per epoch for 2900 images of 28 x 28 on 2 CPU cores shared with other jobs.
    Returns the per-epoch training ``loss`` and ``accuracy`` (there is no held-out split here; hold one
    out to judge the extractor, and never train it on the images it will score).
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
        features = _FeatureNet(images.shape[1], dim)
        model = nn.Sequential(features, nn.Linear(dim, num_classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    history = []
    for epoch in range(epochs):
        stats = _train_epoch(model, optimizer, images, labels, batch_size, generator)
        history.append({"epoch": float(epoch + 1), **stats})
    if not math.isfinite(history[-1]["loss"]):
        raise MetricError("domain extractor training diverged (non-finite loss)")
    _save_scripted(features, out_path)
    return history
