"""python -m dgan.sample in subprocesses, exactly as the README shows it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The same tiny run as tests/test_evaluate.py (same overrides, same folder): trained once per session.
# T=100 keeps DDPM, which always runs all T steps, cheap.
TINY_TRAIN = ["model.decoder_channels=[32,16,16,16]", "model.time_dim=32", "model.d_channels=16",
              "train.batch_size=4", "data.num_images=64", "log.num_samples=4", "log.sample_steps=4",
              "train.device=cpu", "log.run_name=r", "train.total_kimg=0.02", "log.progress=false",
              "diffusion.num_steps=100", "gan.t_max=99", "gan.adv_t_max=40"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    # One thread: on a small shared CPU, OpenMP spinning across processes costs more than it gains.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "dgan-tiny-run" / "runs"
    found = sorted((root / "r" / "checkpoints").glob("ckpt-0*.pt"))
    if not found:
        shutil.rmtree(root, ignore_errors=True)
        r = _run([sys.executable, "-m", "dgan.train", *TINY_TRAIN, f"log.root={root}",
                  f"data.cache_dir={root / '.cache'}"])
        assert r.returncode == 0, r.stderr[-3000:]
        found = sorted((root / "r" / "checkpoints").glob("ckpt-0*.pt"))
    return found[-1]


def _sample(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "dgan.sample", *args])


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_readme_command_writes_seeded_pngs_and_a_grid(checkpoint, tmp_path):
    readme = ["--checkpoint", str(checkpoint), "--n", "8", "--sampler", "ddim", "--steps", "10"]
    first = _sample(*readme, "--out", str(tmp_path / "a"), "--seed", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    a = _pngs(tmp_path / "a")
    assert sorted(a) == [f"{i:05d}.png" for i in range(8)] + ["grid.png"]
    for name in a:
        size = Image.open(tmp_path / "a" / name).size
        # grid: ceil(sqrt(8)) = 3 columns and 3 rows of 32 px with 2 px padding
        assert size == ((3 * 34 + 2,) * 2 if name == "grid.png" else (32, 32)), name
    assert len({a[f"{i:05d}.png"] for i in range(8)}) == 8  # eight different samples

    # The same seed again (this time also saving the trajectory): byte-identical images.
    again = _sample(*readme, "--out", str(tmp_path / "b"), "--seed", "0", "--trajectory")
    assert again.returncode == 0, again.stderr[-3000:]
    b = _pngs(tmp_path / "b")
    assert b.pop("trajectory.png") and "trajectory.png" not in a
    assert b == a
    # 10 DDIM steps: the x0 prediction after every step (10 // 10 = 1) plus the last again, in one row
    assert Image.open(tmp_path / "b" / "trajectory.png").size == (11 * 34 + 2, 34 + 2)

    other = _sample(*readme, "--out", str(tmp_path / "c"), "--seed", "1")
    assert other.returncode == 0, other.stderr[-3000:]
    c = _pngs(tmp_path / "c")
    assert sorted(c) == sorted(a)
    assert all(c[f"{i:05d}.png"] != a[f"{i:05d}.png"] for i in range(8))  # the seed matters


def test_ddpm_sampler_runs_all_steps(checkpoint, tmp_path):
    r = _sample("--checkpoint", str(checkpoint), "--n", "2", "--sampler", "ddpm", "--out", str(tmp_path),
                "--seed", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    images = _pngs(tmp_path)
    assert sorted(images) == ["00000.png", "00001.png", "grid.png"]
    assert images["00000.png"] != images["00001.png"]
    assert "wrote 2 images" in r.stdout
