"""python -m dgan.visualize forward|samplers in subprocesses, as the README shows them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgan.visualize import FORWARD_T_VALUES, header_height

from cli_helpers import run_cli
from cli_helpers import tiny_run

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

CELL = 32 + 2  # a 32 px image plus save_grid's 2 px padding


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")


def _visualize(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli([sys.executable, "-m", "dgan.visualize", *args])


def _cell(image: np.ndarray, row: int, col: int, top: int) -> np.ndarray:
    y, x = top + 2 + row * CELL, 2 + col * CELL
    return image[y:y + 32, x:x + 32].astype(np.float64)


def test_forward_strip_of_a_run(run_dir, tmp_path):
    out = tmp_path / "forward.png"
    t_values = (0, 20, 50, 99)  # this run has T = 100
    r = _visualize("forward", "--run", str(run_dir), "--t-values", ",".join(map(str, t_values)), "--n", "3",
                   "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    image = Image.open(out)
    columns, rows, top = len(t_values), 3, header_height(1)
    assert image.size == (columns * CELL + 2, rows * CELL + 2 + top)
    pixels = np.asarray(image.convert("L"))
    for row in range(rows):
        # Each column is further from the clean image than the one before: t grows left to right.
        clean = _cell(pixels, row, 0, top)
        distance = [np.abs(_cell(pixels, row, col, top) - clean).mean() for col in range(columns)]
        assert distance[0] == 0 and all(a < b for a, b in zip(distance[1:], distance[2:])), distance
    assert "t = 0, 20, 50, 99" in r.stdout


def test_forward_strip_defaults_and_t_checked_against_the_schedule():
    from dgan.config import load_config
    from dgan.visualize import forward_strip

    x = forward_strip(load_config(None, []), n=2, t_values=FORWARD_T_VALUES, split="val", seed=0)
    assert FORWARD_T_VALUES == (0, 50, 100, 200, 400, 600, 800, 999)
    assert x.shape == (2 * len(FORWARD_T_VALUES), 1, 32, 32)
    assert float(x[0].std()) < float(x[7].std())  # t = 999 is close to unit-variance noise
    short = load_config(None, ["diffusion.num_steps=100", "diffusion.beta_end=0.2", "gan.t_max=99", "gan.adv_t_max=40"])
    with pytest.raises(ValueError, match="diffusion.num_steps=100"):
        forward_strip(short, n=2, t_values=FORWARD_T_VALUES, split="val", seed=0)


def test_samplers_from_the_same_noise_with_their_times(run_dir, tmp_path):
    checkpoint = sorted((run_dir / "checkpoints").glob("ckpt-0*.pt"))[-1]
    out = tmp_path / "samplers.png"
    r = _visualize("samplers", "--checkpoint", str(checkpoint), "--n", "3", "--ddim-steps", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(out).size == (3 * CELL + 2, 2 * CELL + 2 + header_height(2))  # DDPM row, DDIM row
    timing = json.loads(out.with_suffix(".json").read_text())
    assert (timing["ddpm"]["steps"], timing["ddim"]["steps"], timing["n"]) == (100, 5, 3)
    assert timing["ddpm"]["seconds"] > 0 and timing["ddim"]["seconds"] > 0
    assert f"DDPM-100: {timing['ddpm']['seconds']:.2f} s" in r.stdout
    assert f"DDIM-5: {timing['ddim']['seconds']:.2f} s" in r.stdout
