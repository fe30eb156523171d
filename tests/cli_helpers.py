"""Shared by the CLI tests: one tiny trained run per pytest session, and a subprocess runner
that calls the commands the way a user does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# T=100 keeps DDPM, which always runs all T steps, cheap for the sample/visualize tests.
TINY_TRAIN = ["model.decoder_channels=[32,16,16,16]", "model.time_dim=32", "model.d_channels=16",
              "train.batch_size=4", "data.num_images=64", "log.num_samples=4", "log.sample_steps=4",
              "train.device=cpu", "log.run_name=r", "train.total_kimg=0.02", "log.progress=false",
              "diffusion.num_steps=100", "diffusion.beta_end=0.2", "gan.t_max=99", "gan.adv_t_max=40"]


def cli_env(**extra: str) -> dict[str, str]:
    # One thread: on a small shared CPU, OpenMP spinning across processes costs more than it gains.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120", **extra}


def run_cli(args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def tiny_run(base: Path) -> Path:
    """A trained tiny run under base/runs: trained once per pytest session, then reused."""
    root = base / "runs"
    run = root / "r"
    if list((run / "checkpoints").glob("ckpt-0*.pt")):
        return run
    shutil.rmtree(root, ignore_errors=True)
    r = run_cli([sys.executable, "-m", "dgan.train", *TINY_TRAIN, f"log.root={root}",
                 f"data.cache_dir={root / '.cache'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return run
