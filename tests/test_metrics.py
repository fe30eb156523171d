"""Tests for dgan.metrics: FID/KID through torch-fidelity with extractors built here, the reference
cache, PSNR/SSIM against theory, and the offline failure for missing Inception weights.

Nothing is downloaded: the extractors are built by the tests, and the Inception test uses a randomly
initialised weights file written by the test itself.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity.feature_extractor_inceptionv3 as inception

from dgan.metrics import (
    INCEPTION,
    MetricError,
    build_tiny_extractor,
    fid_kid,
    inception_weights_cache_path,
    psnr_ssim,
    resolve_inception_weights,
    to_uint8,
    train_domain_extractor,
)
from dgan.metrics.fidelity import load_scripted

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"


@pytest.fixture(scope="module")
def xrays() -> tuple[torch.Tensor, torch.Tensor]:
    """PneumoniaMNIST train split: uint8 images N x 1 x 28 x 28 and labels N (read-only file)."""
    if not DATA.is_file():
        pytest.skip(f"reference data missing: {DATA}")
    with np.load(DATA) as data:
        images = torch.from_numpy(data["train_images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(data["train_labels"].copy()).reshape(-1).long()
    return images, labels


@pytest.fixture(scope="module")
def tiny_extractor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_extractor(tmp_path_factory.mktemp("extractor") / "tiny.pt", channels=1, dim=64)


def _blur(images: torch.Tensor) -> torch.Tensor:
    """3 x 3 binomial blur of uint8 N x 1 x H x W images."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3)
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel).round().clamp(0, 255).to(torch.uint8)


def _noise_like(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=generator)


# --------------------------------------------------------------------------------------------------
# FID / KID with a random-feature extractor
# --------------------------------------------------------------------------------------------------


def test_fid_kid_orders_identical_blurred_and_noise(xrays, tiny_extractor, tmp_path) -> None:
    images, _ = xrays
    real, other = images[:500], images[500:1000]
    # Caching the reference computes its features once for the three comparisons.
    common = dict(extractor_path=tiny_extractor, cache_dir=tmp_path, real_cache_key="ref")
    same = fid_kid(real, real.clone(), **common)
    blurred = fid_kid(real, _blur(other), **common)
    noise = fid_kid(real, _noise_like(other), **common)

    assert set(same) == {"fid", "kid", "kid_std"}
    assert noise["fid"] > 1.0  # He-initialised random features are O(1), so noise is far away
    assert abs(same["fid"]) < 1e-3 * noise["fid"]
    assert abs(same["fid"]) < 1e-6
    assert blurred["fid"] < noise["fid"]
    assert blurred["kid"] < noise["kid"]
    assert same["kid"] < blurred["kid"]


def test_fid_kid_honours_requested_metrics_and_kid_subset(xrays, tiny_extractor) -> None:
    images, _ = xrays
    real, fake = images[:60], images[60:100]
    only_fid = fid_kid(real, fake, extractor_path=tiny_extractor, kid=False)
    assert set(only_fid) == {"fid"}
    # Default subset = min(1000, 40): the 40 fakes are always all drawn but the 60 reals are not,
    # so subsets differ and the spread is positive.
    only_kid = fid_kid(real, fake, extractor_path=tiny_extractor, fid=False)
    assert set(only_kid) == {"kid", "kid_std"} and only_kid["kid_std"] > 0
    with pytest.raises(MetricError, match="kid_subset_size"):
        fid_kid(real, fake, extractor_path=tiny_extractor, kid_subset_size=41)
    with pytest.raises(MetricError, match="uint8"):
        fid_kid(real.float(), fake, extractor_path=tiny_extractor)
    with pytest.raises(MetricError, match="unsupported extractor"):
        fid_kid(real, fake, extractor="clip-vit-b-32")
    with pytest.raises(MetricError, match="not found"):
        fid_kid(real, fake, extractor_path=tiny_extractor.with_name("missing.pt"))


class _NotFlat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()  # N x C x H x W, not N x D


def test_extractor_with_wrong_output_shape_is_reported(xrays, tmp_path) -> None:
    images, _ = xrays
    path = tmp_path / "not_flat.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_NotFlat()), str(path))
    with pytest.raises(MetricError, match=r"returned \(8, 1, 28, 28\)"):
        fid_kid(images[:8], images[8:16], extractor_path=path)


def test_tiny_extractor_accepts_rgb_and_other_sizes(xrays, tiny_extractor) -> None:
    images, _ = xrays
    net = load_scripted(tiny_extractor)
    gray = images[:8]
    features = net(gray)
    assert features.shape == (8, 64) and features.dtype == torch.float32
    # A grayscale extractor averages RGB, so replicated gray gives the same features.
    torch.testing.assert_close(net(gray.expand(-1, 3, -1, -1)), features)
    assert net(F.interpolate(gray.float(), size=40).to(torch.uint8)).shape == (8, 64)
    # Same seed, same network; another seed, another one.
    again = load_scripted(build_tiny_extractor(tiny_extractor.with_name("again.pt"), channels=1, dim=64))
    torch.testing.assert_close(again(gray), features)
    other = load_scripted(build_tiny_extractor(tiny_extractor.with_name("other.pt"), channels=1, dim=64, seed=1))
    assert not torch.allclose(other(gray), features)


# --------------------------------------------------------------------------------------------------
# Reference statistics cache
# --------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_reference_cache_is_reused_and_keyed(xrays, tiny_extractor, tmp_path, monkeypatch) -> None:
    images, _ = xrays
    real, fake = images[:200], images[200:400]
    cache = tmp_path / "cache"
    args = dict(extractor_path=tiny_extractor, cache_dir=cache, real_cache_key="val")
    first = fid_kid(real, fake, **args)
    files = _snapshot(cache)
    assert any(name.startswith("val-1x28x28-n200-") and "stat-fid" in name for name in files)
    assert any("features" in name for name in files)

    second = fid_kid(real, fake, **args)
    assert second == first
    assert _snapshot(cache) == files  # read back, not rewritten

    # Shifting the cached mean must move FID: proof that the statistics come from the cache file.
    (stat_file,) = cache.glob("*stat-fid*")
    stats = torch.load(stat_file, weights_only=False)
    stats["mu"] = stats["mu"] + 10.0
    torch.save(stats, stat_file)
    tampered = fid_kid(real, fake, **args)
    assert tampered["fid"] > first["fid"] + 1000.0
    assert tampered["kid"] == first["kid"]  # KID reads the (untouched) feature file

    # Other reference content or another extractor must not hit the same entry.
    changed = real.clone()
    changed[0, 0, 0, 0] ^= 1
    fid_kid(changed, fake, **args)
    other_net = build_tiny_extractor(tmp_path / "other.pt", seed=1)
    fid_kid(real, fake, **{**args, "extractor_path": other_net})
    assert len(_snapshot(cache)) == 3 * len(files)

    # Without cache_dir nothing is written, not even under torch-fidelity's default $TORCH_HOME.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    fid_kid(real, fake, extractor_path=tiny_extractor, real_cache_key="val")
    assert not (tmp_path / "torch_home").exists()
    with pytest.raises(MetricError, match="real_cache_key"):
        fid_kid(real, fake, **{**args, "real_cache_key": "a/b"})


# --------------------------------------------------------------------------------------------------
# Trained domain extractor
# --------------------------------------------------------------------------------------------------


def test_domain_extractor_trains_and_ranks_blur_and_noise(xrays, tmp_path) -> None:
    images, labels = xrays
    # Balanced training subset from the end of the split; the FID sets below come from the start.
    pool = torch.arange(1000, images.shape[0])
    train = torch.cat([pool[labels[pool] == c][:250] for c in (0, 1)])
    path = tmp_path / "domain.pt"
    history = train_domain_extractor(images[train], labels[train], path, dim=32, epochs=3)
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["accuracy"] > 0.75  # normal vs pneumonia is learnable; chance is 0.5
    assert load_scripted(path)(images[:4]).shape == (4, 32)

    real, other = images[:300], images[300:600]
    scores = {
        name: fid_kid(real, fake, extractor_path=path)
        for name, fake in (("other", other), ("blur", _blur(other)), ("noise", _noise_like(other)))
    }
    assert scores["other"]["fid"] < scores["blur"]["fid"] < scores["noise"]["fid"]
    assert scores["other"]["kid"] < scores["blur"]["kid"] < scores["noise"]["kid"]


# --------------------------------------------------------------------------------------------------
# Inception: default path, weights resolution, offline failure
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised inception-v3-compat state dict, so the default path runs offline."""
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng(devices=[]):
        # Skip the weights download and load: the freshly initialised layers are what we save.
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def _refuse_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch-fidelity tried to download Inception weights")


def test_inception_replicates_gray_and_loads_given_weights(xrays, random_inception_weights, monkeypatch) -> None:
    images, _ = xrays
    monkeypatch.setattr(inception, "load_state_dict_from_url", _refuse_download)
    # 75 px instead of 299 px: 16x fewer FLOPs on CPU; the pipeline under test is the same.
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    gray = images[:4]  # 1 channel: Inception asserts 3, so this fails unless gray is replicated
    # KID only: FID on 2048-d features spends ~10 s of CPU in one eigendecomposition, and the FID
    # arithmetic is the same code as with the extractors tested above.
    out = fid_kid(gray, _blur(gray), fid_weights=random_inception_weights, fid=False)
    assert set(out) == {"kid", "kid_std"}
    assert all(math.isfinite(v) for v in out.values())
    with pytest.raises(MetricError, match="1 or 3 channels"):
        fid_kid(gray.expand(-1, 2, -1, -1), gray.expand(-1, 2, -1, -1), fid_weights=random_inception_weights)


def test_inception_weights_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE
    assert inception_weights_cache_path() == expected
    with pytest.raises(MetricError, match="--fid-weights PATH"):
        resolve_inception_weights()
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(MetricError, match=str(missing)):
        resolve_inception_weights(missing)
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"placeholder")
    assert resolve_inception_weights() == expected
    assert resolve_inception_weights(expected) == expected


_OFFLINE_SCRIPT = """
import json, socket, sys, time, urllib.request
attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args)[:120])
    raise OSError("network disabled by test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse

import torch
from dgan.metrics import MetricError, fid_kid

images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
start = time.perf_counter()
try:
    fid_kid(images, images)
    message = None
except MetricError as err:
    message = str(err)
except Exception as err:  # e.g. a refused download: reported through `during` below
    message = None
seconds = time.perf_counter() - start
during = list(attempts)
try:  # control: the recorder does see a real download attempt
    urllib.request.urlopen("https://github.com", timeout=1)
except OSError:
    pass
print(json.dumps({"seconds": seconds, "message": message, "during": during, "control": len(attempts)}))
"""


def test_missing_inception_weights_fail_fast_without_network(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_HOME", "XDG_CACHE_HOME", "TORCH_HUB")}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        TORCH_HOME=str(tmp_path / "torch"),
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["message"] is not None, "fid_kid ran without Inception weights"
    assert result["seconds"] < 5.0
    assert WEIGHTS_FILE in result["message"] and WEIGHTS_URL in result["message"]
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in result["message"]
    assert "\n" not in result["message"]
    assert result["during"] == []
    assert result["control"] > 0


# --------------------------------------------------------------------------------------------------
# PSNR / SSIM / uint8 conversion
# --------------------------------------------------------------------------------------------------


def test_psnr_ssim_of_identical_images() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 32, 32, generator=generator) * 2 - 1
    out = psnr_ssim(images, images.clone())
    assert out["psnr"] == math.inf
    assert out["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_psnr_of_gaussian_noise_matches_theory() -> None:
    sigma = 0.05
    generator = torch.Generator().manual_seed(0)
    target = torch.zeros(32, 1, 64, 64, dtype=torch.float64)  # mid-gray on the [-1, 1] scale
    noisy = target + sigma * torch.randn(target.shape, generator=generator, dtype=torch.float64)
    assert noisy.abs().max() < 1.0  # no clipping, so the theory applies exactly
    out = psnr_ssim(noisy, target, data_range=2.0)
    theory = 10 * math.log10(2.0**2 / sigma**2)
    assert abs(out["psnr"] - theory) < 0.1
    assert out["ssim"] < 0.9


def test_psnr_is_averaged_per_image() -> None:
    target = torch.zeros(2, 1, 16, 16)
    pred = target + torch.tensor([0.1, 0.4]).view(2, 1, 1, 1)  # per-image MSE 0.01 and 0.16
    expected = (10 * math.log10(4 / 0.01) + 10 * math.log10(4 / 0.16)) / 2
    assert psnr_ssim(pred, target)["psnr"] == pytest.approx(expected, abs=1e-4)
    # uint8 images on their own scale give the same number as the same images mapped to [-1, 1].
    as_uint8 = to_uint8(pred)
    on_uint8 = psnr_ssim(as_uint8, to_uint8(target), data_range=255.0)["psnr"]
    on_unit = psnr_ssim(as_uint8.float() / 127.5 - 1, to_uint8(target).float() / 127.5 - 1)["psnr"]
    assert on_uint8 == pytest.approx(on_unit, abs=1e-4)
    with pytest.raises(MetricError, match="shapes"):
        psnr_ssim(pred, target[:1])


def test_to_uint8_rounds_and_clamps() -> None:
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8
    with pytest.raises(MetricError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
