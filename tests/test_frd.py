"""FRD, the Fréchet Radiomics Distance of the optional `frd` extra: it ranks real X-rays below their
blurred copies, says how to install it when missing, and runs in python -m dgan.evaluate and in
evaluate_generator (the trainer's periodic evaluation)."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import REPO, run_cli, tiny_run

from dgan.metrics import FRD_INSTALL, MetricError, frd

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

SHARED_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
SET_SIZE = 12  # images per set: FRD costs about 0.2 s per image on 2 shared cores


@pytest.fixture(scope="module")
def frd_installed() -> None:
    reason = f"FRD needs the `frd` extra (CI installs it with the test extra): {FRD_INSTALL}"
    pytest.importorskip("frd_score", reason=reason)
    pytest.importorskip("radiomics", reason=reason)


@pytest.fixture(scope="module")
def xrays() -> torch.Tensor:
    if not SHARED_NPZ.is_file():
        pytest.skip(f"{SHARED_NPZ} not present")
    with np.load(SHARED_NPZ) as data:
        return torch.from_numpy(data["train_images"][: 2 * SET_SIZE]).unsqueeze(1)  # uint8 N x 1 x 28 x 28


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")  # the one test_evaluate uses


def _blur(images: torch.Tensor) -> torch.Tensor:
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    return blurred.round().to(torch.uint8)


def test_frd_ranks_a_disjoint_half_below_its_blurred_copy(frd_installed, xrays):
    reference, held_out = xrays[:SET_SIZE], xrays[SET_SIZE:]
    same, blurred = frd(reference, held_out), frd(reference, _blur(held_out))
    print(f"FRD of {SET_SIZE} vs {SET_SIZE} X-rays: same distribution {same:.3f}, 3x3-blurred {blurred:.3f}")
    assert math.isfinite(same) and math.isfinite(blurred)
    # Observed (log d^2): 5.9-6.6 for disjoint halves, 7.7-9.2 blurred, 9.8-11.3 for phantoms, at 12-16
    # images a set. A +40 grey-level shift scores like the same distribution: FRDv1's radiomics
    # settings normalise every image by its own mean and std first.
    assert blurred > same + 1.0


def test_frd_is_deterministic_and_scores_rgb_on_its_grey_levels(frd_installed, xrays):
    reference, fake = xrays[:4], xrays[SET_SIZE:SET_SIZE + 4]
    gray = frd(reference, fake)
    # Replicated grey in RGB has the same luma; one worker instead of several gives the same features.
    assert frd(reference.expand(-1, 3, -1, -1), fake.expand(-1, 3, -1, -1), num_workers=1) == gray


def test_frd_refuses_flat_images_and_bad_shapes(frd_installed, xrays):
    flat = xrays[:4].clone()
    flat[2] = 0  # what a collapsed generator produces; radiomics cannot normalise it
    with pytest.raises(MetricError, match=r"fake images: 1 of 4 are a single grey level \(first: index 2\)"):
        frd(xrays[4:8], flat)
    with pytest.raises(MetricError, match="1 .grey. or 3 .RGB. channels, got 2"):
        frd(xrays[:4].expand(-1, 2, -1, -1), xrays[4:8])
    with pytest.raises(MetricError, match="uint8"):
        frd(xrays[:4].float(), xrays[4:8])


@pytest.mark.parametrize("module", ["frd_score", "radiomics"])
def test_missing_extra_names_the_install_command(module, monkeypatch, capsys):
    from dgan import evaluate, scoring

    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now fails, as when not installed
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(MetricError, match=module) as err:
        frd(images, images)
    assert 'pip install -e ".[frd]"' in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MetricError, match=r"\[frd\]"):
        scoring.check_request(["fid", "frd"], sampler="ddim", steps=4, num_samples=8, t_values=(), num_steps=None)
    # The CLI stops before it even looks for the checkpoint (which does not exist here).
    assert evaluate.main(["--frd", "--checkpoint", "/nonexistent/ckpt.pt", "--no-mlflow"]) == 1
    assert 'pip install -e ".[frd]"' in capsys.readouterr().err
    assert "frd" not in evaluate.DEFAULT_METRICS  # no metric flag: FID/KID/PSNR/SSIM, no extra needed


def test_cli_frd_goes_to_the_json_and_the_table(frd_installed, run_dir, tmp_path):
    checkpoint = max((run_dir / "checkpoints").glob("ckpt-0*.pt"))
    out = tmp_path / "eval.json"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--frd", "--checkpoint", str(checkpoint), "--num-samples",
                 "6", "--sampler", "ddim", "--steps", "4", "--batch-size", "6", "--reference-images", "8",
                 "--out", str(out), "--no-mlflow"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"frd"} and math.isfinite(report["metrics"]["frd"])
    assert report["num_samples"] == 6 and report["reference"]["num_images"] == 8
    print(f"FRD of the tiny run's 6 samples against 8 reference phantoms: {report['metrics']['frd']:.3f}")
    assert any(line.split()[1:2] == ["frd"] for line in r.stdout.splitlines())  # the table's row
    # MLflow gets every key of report["metrics"] as eval/<key> (tests/test_evaluate.py checks that path):
    # left out here, it would double this test's time.


def test_evaluate_generator_computes_frd(frd_installed, run_dir):
    from dgan.scoring import evaluate_generator
    from dgan.generation import load_generator

    checkpoint = max((run_dir / "checkpoints").glob("ckpt-0*.pt"))
    G, cfg, diffusion, _ = load_generator(checkpoint, torch.device("cpu"))
    # Phantom references number data.num_images: 4 keep this test to a few seconds.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_images=4))
    metrics = evaluate_generator(G, diffusion, cfg, num_samples=3, sampler="ddim", steps=2, seed=0,
                                 metrics=["frd"], device=torch.device("cpu"))
    assert set(metrics) == {"frd"} and math.isfinite(metrics["frd"])
