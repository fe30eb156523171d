"""`dgan.evaluate --report` (issue 12): one self-contained HTML page, opened in a real headless
Chromium to prove that it renders with its pictures."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

from dgan.metrics import build_tiny_extractor

pytestmark = pytest.mark.slow  # a CLI evaluation and a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, sandbox off (CI runs as root), and nothing that phones out: the machine has no network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1000,2400"]


@pytest.fixture(scope="module")
def report(tiny_run_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    """--report on a copy of the session's tiny (unconditional, phantom) run; 300 fresh phantoms as
    the held-out set, so the memorization baseline has its 200."""
    base = tmp_path_factory.mktemp("report")
    run = base / "r"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("mlflow*", ".cache"))
    extractor = build_tiny_extractor(base / "tiny.pt")
    out = base / "eval.json"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--report", "--run", str(run), "--num-samples", "64",
                 "--steps", "5", "--reference-images", "300", "--recon-images", "64", "--t-values", "10,50", "--feature-extractor",
                 str(extractor), "--no-mlflow", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no utility score, the model is unconditional" in r.stdout
    return out, json.loads(out.read_text())


def test_report_holds_every_metric_with_its_floor_and_embedded_pictures(report):
    out, data = report
    m = data["metrics"]
    for key in ("fid", "kid", "psnr_t50", "sharpness", "precision", "recall", "density", "coverage", "memorization_rate",
                "real_memorization_rate", "ms_ssim", "real_ms_ssim"):
        assert key in m, key
    page = Path(data["html_path"]).read_text()
    assert Path(data["html_path"]).parent == out.parent
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2  # the sample grid and the memorization pairs
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    assert "<svg" in page and "memorization_rate" in page and "real floor" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "<script" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine; .ci/run installs Debian's chromium")
def test_report_renders_in_a_headless_browser(report, tmp_path):
    page = Path(report[1]["html_path"])
    shot = tmp_path / "report.png"
    r = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                        f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    # The page's pictures are there: mid-grey sample pixels, not only white page and black text.
    greys = ((pixels > 20) & (pixels < 235)).mean()
    print(f"screenshot {pixels.shape}, share of grey pixels {greys:.3f}")
    assert pixels.shape[1] >= 900 and greys > 0.02
