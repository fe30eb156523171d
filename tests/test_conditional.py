"""Class-conditional training and classifier-free guidance, end to end through the CLIs.

Two classes that are easy to tell apart: dark phantoms (label 0) and bright ones (label 1),
written as a MedMNIST-style npz. A tiny conditional model is trained with label dropout; the
samples of each class, drawn with `python -m dgan.sample --class C --guidance 2.0`, must sit
closer to their own class's intensity statistics than to the other class's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import wasserstein_distance

from cli_helpers import TINY_TRAIN, run_cli
from dgan.data.synthetic import make_phantoms

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

NUM_IMAGES = 256
STEPS = 200
BATCH = 16


def two_class_npz(path: Path) -> dict[int, np.ndarray]:
    """Dark (0) and bright (1) phantoms; returns each class's per-image mean intensities in [0, 1]."""
    phantoms, _ = make_phantoms(NUM_IMAGES, 32, seed=3)
    labels = np.arange(NUM_IMAGES) % 2
    x = phantoms.astype(np.float32) / 255.0
    # Same anatomy in both classes: only the intensity window differs, so a model that ignores
    # the label lands between the two classes and fails the test.
    images = np.where(labels[:, None, None] == 0, 0.45 * x, 0.55 + 0.45 * x)
    images = np.round(images * 255).astype(np.uint8)
    np.savez(path, train_images=images, train_labels=labels[:, None], val_images=images[:64],
             val_labels=labels[:64, None])
    return {c: images[labels == c].reshape(-1, 32 * 32).mean(1) / 255.0 for c in (0, 1)}


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("conditional")
    class_means = two_class_npz(base / "two.npz")
    overrides = [o for o in TINY_TRAIN if not o.startswith(("train.batch_size", "train.total_kimg"))]
    r = run_cli([sys.executable, "-m", "dgan.train", *overrides, "data.source=npz", f"data.path={base / 'two.npz'}",
                 "model.num_classes=2", "train.label_dropout=0.2", f"train.batch_size={BATCH}",
                 f"train.total_kimg={STEPS * BATCH / 1000}", "train.warmup_kimg=0.1", "train.ema_halflife_kimg=0.2",
                 f"log.root={base / 'runs'}", f"data.cache_dir={base / 'cache'}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = sorted((base / "runs" / "r" / "checkpoints").glob("ckpt-0*.pt"))[-1]
    return ckpt, class_means, base


def sample_class(ckpt: Path, label: int, guidance: float, out: Path) -> np.ndarray:
    """Per-image mean intensities in [0, 1] of 32 samples of one class, via the README command."""
    r = run_cli([sys.executable, "-m", "dgan.sample", "--checkpoint", str(ckpt), "--class", str(label),
                 "--guidance", str(guidance), "--n", "32", "--steps", "10", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    images = [np.asarray(Image.open(p), np.float32) / 255.0 for p in sorted(out.glob("0*.png"))]
    assert len(images) == 32
    return np.stack(images).reshape(32, -1).mean(1)


@pytest.mark.parametrize("label", [0, 1])
def test_guided_samples_match_their_own_class(conditional_run, label, tmp_path):
    ckpt, class_means, _ = conditional_run
    samples = sample_class(ckpt, label, 2.0, tmp_path / f"class{label}")
    own = wasserstein_distance(samples, class_means[label])
    other = wasserstein_distance(samples, class_means[1 - label])
    print(f"class {label}: sample mean {samples.mean():.3f}, data means {class_means[0].mean():.3f} / "
          f"{class_means[1].mean():.3f}; W1 to own class {own:.3f}, to the other {other:.3f}")
    # Margin: the class means are 0.55 apart; the samples must sit at least twice as near their own.
    assert own < 0.5 * other


def test_unknown_class_is_a_clear_error(conditional_run, tmp_path):
    ckpt, _, _ = conditional_run
    r = run_cli([sys.executable, "-m", "dgan.sample", "--checkpoint", str(ckpt), "--class", "2", "--n", "2",
                 "--steps", "2", "--out", str(tmp_path)])
    assert r.returncode == 2
    assert "num_classes=2" in r.stderr



def test_evaluate_per_class_scores_each_class_against_its_own_references(conditional_run, tmp_path):
    """`dgan.evaluate --per-class`: class k's samples (index i has label i % K) against class k's
    reference images. Recomputed here from the dumped samples and the labelled references."""
    import json

    import torch

    from dgan.checkpoint import load_checkpoint
    from dgan.config import config_from_dict
    from dgan.reference import load_reference
    from dgan.metrics import build_tiny_extractor, fid_kid, to_uint8

    ckpt, _, _ = conditional_run
    extractor = build_tiny_extractor(tmp_path / "tiny.pt")
    out, dump = tmp_path / "eval.json", tmp_path / "samples.pt"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--fid", "--kid", "--per-class", "--guidance", "2.0",
                 "--checkpoint", str(ckpt), "--num-samples", "32", "--steps", "10", "--feature-extractor",
                 str(extractor), "--out", str(out), "--no-mlflow", "--dump-samples", str(dump)])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["guidance"] == 2.0
    assert {"fid", "kid", "fid_c0", "fid_c1", "kid_c0", "kid_c1"} <= set(m)
    samples = torch.load(dump, weights_only=True)["images"]
    real, labels = load_reference(config_from_dict(load_checkpoint(ckpt)["metadata"]["config"]), "val")
    for c in (0, 1):
        want = fid_kid(to_uint8(real[labels == c]), samples[c::2], extractor_path=extractor, kid=False)["fid"]
        wrong = fid_kid(to_uint8(real[labels == 1 - c]), samples[c::2], extractor_path=extractor, kid=False)["fid"]
        print(f"class {c}: FID vs own references {m[f'fid_c{c}']:.2f} (recomputed {want:.2f}), "
              f"vs the other class's {wrong:.2f}")
        assert m[f"fid_c{c}"] == pytest.approx(want, rel=1e-4)
        assert m[f"fid_c{c}"] != pytest.approx(wrong, rel=1e-2)


def test_per_class_on_an_unconditional_model_is_a_clear_error(tmp_path_factory, tmp_path):
    from cli_helpers import tiny_run
    from dgan.metrics import build_tiny_extractor

    run = tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--fid", "--per-class", "--run", str(run),
                 "--num-samples", "4", "--steps", "2", "--no-mlflow",
                 "--feature-extractor", str(build_tiny_extractor(tmp_path / "tiny.pt"))])
    assert r.returncode == 1
    assert "--per-class needs a class-conditional model" in r.stderr


def test_audit_on_the_conditional_run_and_its_clear_refusals(conditional_run, tiny_run_dir, tmp_path):
    """dgan.evaluate --prdc --diversity --utility on the class-conditional run (issue 12) gives every
    metric with its real floor. --memorization without 200 held-out images, --utility with too few
    real images per class or on an unconditional run, stop in one line before any sampling (5000
    samples would take many minutes)."""
    import json
    import time

    from dgan.metrics import build_tiny_extractor

    ckpt, _, _ = conditional_run
    extractor, out = build_tiny_extractor(tmp_path / "tiny.pt"), tmp_path / "eval.json"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--prdc", "--diversity", "--utility", "--utility-per-class",
                 "16", "--num-samples", "64", "--steps", "5", "--checkpoint", str(ckpt), "--feature-extractor",
                 str(extractor), "--no-mlflow", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())["metrics"]
    for key in ("precision", "recall", "density", "coverage", "real_precision", "real_recall", "real_density",
                "real_coverage", "ms_ssim", "real_ms_ssim", "utility_synthetic_balanced_accuracy",
                "utility_synthetic_auroc", "utility_real_balanced_accuracy", "utility_real_auroc"):
        assert key in m, key
    assert 0 <= m["coverage"] <= 1 and 0 < m["real_ms_ssim"] < 1 and m["utility_real_balanced_accuracy"] > 0.9
    for args, message in ((["--memorization", "--checkpoint", str(ckpt)], "needs at least 200"),
                          (["--utility", "--utility-per-class", "200", "--checkpoint", str(ckpt)],
                           "use --utility-per-class 128 or less"),
                          (["--utility", "--run", str(tiny_run_dir)], "needs a class-conditional model")):
        clock = time.monotonic()
        r = run_cli([sys.executable, "-m", "dgan.evaluate", *args, "--feature-extractor", str(extractor),
                     "--no-mlflow", "--num-samples", "5000"], timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and message in last and last.startswith("dgan.evaluate: "), r.stderr[-2000:]
        assert time.monotonic() - clock < 60
