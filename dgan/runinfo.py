"""Run directories and provenance (git hash, file hashes) for checkpoints, manifests and MLflow."""
from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from typing import Optional

from dgan import distributed as dist
from dgan.config import Config


def git_hash() -> str:
    """The source tree's commit, or 'unknown' (e.g. an installed wheel); never raises."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def newest_run_with_checkpoints(root: Path) -> Optional[Path]:
    runs = [p.parent.parent for p in root.glob("*/checkpoints/ckpt-*.pt")]
    return max(runs, key=lambda p: max(c.stat().st_mtime for c in (p / "checkpoints").glob("ckpt-*.pt")),
               default=None)


def make_run_dir(cfg: Config, config_path: Optional[str]) -> Path:
    """Decide the run directory once, on rank 0, and share it with every rank.

    - `--resume PATH` continues the run that owns that checkpoint;
    - `--resume auto` with `log.run_name` continues that run; without it, the newest run
      under log.root that has checkpoints (printed, so the user sees what resumed);
    - otherwise a fresh `<config stem>-<timestamp>` (or log.run_name).
    """
    root = Path(cfg.log.root)
    run_dir: Optional[Path] = None
    if dist.is_main():
        resume = cfg.train.resume
        if resume not in (None, "auto"):
            run_dir = Path(resume).resolve().parent.parent
        elif cfg.log.run_name:
            run_dir = root / cfg.log.run_name
        elif resume == "auto":
            run_dir = newest_run_with_checkpoints(root)
            if run_dir is not None:
                print(f"--resume auto: continuing the newest run, {run_dir}", flush=True)
        if run_dir is None:
            stem = Path(config_path).stem if config_path else "default"
            run_dir = root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=True)
    return Path(dist.broadcast_object(str(run_dir) if run_dir else None))
