"""Shared by the tests: the one tiny configuration, one tiny trained run per pytest session, and the
subprocess runner that calls the commands the way a user does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The one tiny configuration: the smallest model that is still the real architecture (UNet++ with
# 4 decoder widths for encoder_depth 4, and the PatchGAN), 4 images per rank and step.
TINY = ["model.encoder=resnet18", "model.decoder_channels=[32,16,16,8]", "model.time_dim=32",
        "model.d_channels=16", "model.image_size=32", "train.batch_size=4"]
# ... without the status line, for runs whose output nobody reads.
TINY_QUIET = [*TINY, "log.progress=false"]
# ... as a CLI training run: 64 built-in phantoms, tiny sample grids, a status line ("step N/M ...")
# every 5 steps, which the signal tests wait for.
TINY_RUN = [*TINY, "data.num_images=64", "log.num_samples=4", "log.sample_steps=4", "log.every_steps=5",
            "train.device=cpu"]
# ... as the session's one trained run (tiny_run). T=100 keeps DDPM, which always runs all T steps,
# cheap for the sample/visualize tests; the widest last decoder stage is what those tests were tuned on.
TINY_TRAIN = [*TINY_RUN, "log.progress=false", "model.decoder_channels=[32,16,16,16]", "log.run_name=r",
              "train.total_kimg=0.02", "diffusion.num_steps=100", "diffusion.beta_end=0.2", "gan.t_max=99",
              "gan.adv_t_max=40"]


def cli_env(**extra: str) -> dict[str, str]:
    # One thread: on a small shared CPU, OpenMP spinning across processes costs more than it gains.
    # The offline settings come from dgan itself (dgan/__init__.py), in every process that imports it.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "COLUMNS": "120", **extra}


def run_cli(args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root, as the README shows it, with the tests' environment."""
    return subprocess.run(args, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], **env: str) -> subprocess.Popen[str]:
    """The same, started in the background with stdout and stderr merged (for signal tests)."""
    return subprocess.Popen(args, cwd=REPO, env=cli_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


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
