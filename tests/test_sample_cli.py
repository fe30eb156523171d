"""python -m dgan.sample in subprocesses, exactly as the README shows it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import run_cli
from cli_helpers import tiny_run

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")
    return sorted((run / "checkpoints").glob("ckpt-0*.pt"))[-1]


def _sample(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli([sys.executable, "-m", "dgan.sample", *args])


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


def test_t_min_moves_the_grids_floor(checkpoint, tmp_path):
    """--t-min 9: no step below t = 9. The tiny run (T = 100) ends its 10 DDIM steps at t = 0, so the
    images change; --t-min 0 is the run's own setting (diffusion.sample_t_min = 0), so they do not; a
    floor outside 0..T-1 is a usage error (exit 2) that writes nothing."""
    base = ["--checkpoint", str(checkpoint), "--n", "4", "--sampler", "ddim", "--steps", "10"]
    outs = {}
    for name, extra in {"run": [], "0": ["--t-min", "0"], "9": ["--t-min", "9"]}.items():
        r = _sample(*base, *extra, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = _pngs(tmp_path / name)
    assert outs["0"] == outs["run"]
    assert all(outs["9"][f"{i:05d}.png"] != outs["run"][f"{i:05d}.png"] for i in range(4))
    bad = _sample(*base, "--t-min", "100", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--t-min 100" in bad.stderr and not (tmp_path / "bad").exists()
    ddpm = _sample("--checkpoint", str(checkpoint), "--n", "1", "--sampler", "ddpm", "--t-min", "9",
                   "--out", str(tmp_path / "ddpm"))
    assert ddpm.returncode == 2 and "--sampler ddpm" in ddpm.stderr and not (tmp_path / "ddpm").exists()
