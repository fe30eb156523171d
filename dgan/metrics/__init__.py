"""Image-quality metrics: FID/KID through torch-fidelity, PSNR/SSIM through torchmetrics, FRD.

The metrics layer under ``python -m dgan.evaluate``, one module per family: fidelity.py (FID/KID,
PSNR/SSIM), frd.py (FRD, optional), extractor.py (domain feature extractors and the small CNN
classifier), features.py (features in FID's space), coverage.py (precision/recall, density/coverage),
memorization.py (nearest training image vs held-out baseline), diversity.py (MS-SSIM between
samples), utility.py (train on synthetic, test on real), neighbours.py (chunked k-NN search). It never downloads
anything. Import from here: ``from dgan.metrics import fid_kid``.

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

from dgan.metrics.coverage import density_coverage, precision_recall
from dgan.metrics.diversity import ms_ssim_diversity
from dgan.metrics.extractor import build_tiny_extractor, fit_classifier, train_domain_extractor
from dgan.metrics.features import extract_features
from dgan.metrics.memorization import MemorizationAudit, closest_pairs
from dgan.metrics.memorization import audit as memorization_audit
from dgan.metrics.utility import train_synthetic_test_real
from dgan.metrics.fidelity import (INCEPTION, MetricError, fid_kid, inception_weights_cache_path, psnr_ssim,
                                   resolve_inception_weights)
from dgan.metrics.frd import FRD_INSTALL, frd, require_frd
from dgan.pixels import to_uint8

__all__ = ["FRD_INSTALL", "INCEPTION", "MemorizationAudit", "MetricError", "build_tiny_extractor", "closest_pairs",
           "density_coverage", "extract_features", "fid_kid", "fit_classifier", "frd", "inception_weights_cache_path",
           "memorization_audit", "ms_ssim_diversity", "precision_recall", "psnr_ssim", "require_frd",
           "resolve_inception_weights", "to_uint8", "train_domain_extractor", "train_synthetic_test_real"]
