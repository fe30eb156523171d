"""FRD, the Frechet Radiomics Distance (optional `frd` extra). See dgan/metrics/__init__.py."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from dgan.errors import MetricError
from dgan.metrics.fidelity import check_images, first_line

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
    check_images(images, role, rgb_only=False)
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
            raise MetricError(f"frd-score: {first_line(err)}") from err
    return float(value)
