"""Where a run lives: the one answer to "which run directory, which checkpoint" for dgan.train,
dgan.sample, dgan.evaluate and the tasks.

A run directory is `<log.root>/<name>/`, holding config.yaml and checkpoints/ckpt-*.pt. A
checkpoint belongs to the run two levels up only when it sits in a `checkpoints/` folder; a loose
file (copied elsewhere, downloaded) belongs to no run, so nothing derived from it is ever written
beside it as if that folder were a run.

`plan_run` decides, before anything is written, where a training run goes and what it resumes
from. The caller creates the directory and writes config.yaml only after the resume target has
been loaded and checked against the config (train.py), so a failed start leaves no half-made
run folder and never overwrites a run's config.yaml with one that does not fit it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dgan import distributed as dist
from dgan.checkpoint import CheckpointError, Checkpointer
from dgan.config import Config, save_config
from dgan.errors import UsageError

CHECKPOINTS = "checkpoints"


def run_of(checkpoint: str | Path) -> Optional[Path]:
    """The run that owns a checkpoint file (runs/<run>/checkpoints/ckpt-*.pt -> runs/<run>), or
    None for a file outside a run's checkpoints/ folder."""
    path = Path(checkpoint).expanduser().resolve()
    return path.parent.parent if path.parent.name == CHECKPOINTS else None


def home_of(checkpoint: str | Path) -> Path:
    """Where outputs derived from a checkpoint go: its run, or the folder of a loose checkpoint file."""
    run = run_of(checkpoint)
    return run if run is not None else Path(checkpoint).expanduser().resolve().parent


def output_dir(checkpoint: str | Path, name: str) -> Path:
    """The default folder `name` for outputs derived from a checkpoint (see home_of)."""
    return home_of(checkpoint) / name


def newest_run(root: str | Path) -> Optional[Path]:
    """The run under root whose newest checkpoint was written last, or None."""
    runs = {p.parent.parent for p in Path(root).expanduser().glob(f"*/{CHECKPOINTS}/ckpt-*.pt")}
    return max(runs, key=lambda p: max(c.stat().st_mtime for c in (p / CHECKPOINTS).glob("ckpt-*.pt")),
               default=None)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest valid checkpoint of a run (corrupt ones are skipped with a warning), or None."""
    return Checkpointer(run_dir / CHECKPOINTS).latest_valid()


def find_checkpoint(run: Optional[str], checkpoint: Optional[str], root: str) -> tuple[Path, Path]:
    """(checkpoint file, home_of it) for dgan.evaluate: --checkpoint as given, else the newest valid
    one of --run, else of the newest run under --root (the run whose newest checkpoint is newest)."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {path}: no such file")
        return path, home_of(path)
    run_dir = Path(run).expanduser() if run is not None else newest_run(root)
    if run_dir is None:
        raise CheckpointError(f"no run with checkpoints under --root {root}; pass --run DIR or --checkpoint PATH")
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"{run_dir}: no valid {CHECKPOINTS}/ckpt-*.pt; pass --checkpoint PATH")
    return found.resolve(), run_dir.resolve()


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    resume: Optional[Path]  # the checkpoint to restore; None: a fresh start


def _fresh_run(cfg: Config, config_path: Optional[str]) -> Path:
    if cfg.log.run_name:
        return Path(cfg.log.root) / cfg.log.run_name
    stem = Path(config_path).stem if config_path else "default"
    return Path(cfg.log.root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resume_path(cfg: Config, config_path: Optional[str], target: Path) -> RunPlan:
    """`--resume PATH`: a checkpoint file, a run's checkpoints/ folder, or a run directory."""
    shown = f"--resume {target}"
    if target.is_file():
        run = run_of(target)
        if run is None:  # a loose checkpoint: continue it in a run of our own, never beside the file
            run = _fresh_run(cfg, config_path)
            print(f"{shown}: the file is not in a run's {CHECKPOINTS}/ folder; continuing it in {run}", flush=True)
        return RunPlan(run, target.resolve())
    if not target.is_dir():
        raise CheckpointError(f"{shown}: no such file or directory; pass a run directory, its "
                              f"{CHECKPOINTS}/ folder, a ckpt-*.pt file, or --resume auto")
    run = target.parent if target.name == CHECKPOINTS else target
    if not (run / CHECKPOINTS).is_dir():
        raise CheckpointError(f"{shown}: not a run directory (it has no {CHECKPOINTS}/ folder); pass "
                              f"runs/<run>, runs/<run>/{CHECKPOINTS} or a ckpt-*.pt file")
    found = latest_checkpoint(run)
    if found is None:
        raise CheckpointError(f"{shown}: {run / CHECKPOINTS} holds no valid ckpt-*.pt; pass a checkpoint file")
    return RunPlan(run.resolve(), found)


def _plan(cfg: Config, config_path: Optional[str]) -> RunPlan:
    resume = cfg.train.resume
    if resume not in (None, "auto"):
        return _resume_path(cfg, config_path, Path(resume).expanduser())
    if resume == "auto":
        run = Path(cfg.log.root) / cfg.log.run_name if cfg.log.run_name else newest_run(cfg.log.root)
        if run is not None:
            found = latest_checkpoint(run)
            if not cfg.log.run_name:
                print(f"--resume auto: continuing the newest run, {run}", flush=True)
            return RunPlan(run, found)  # found None: the named run has no checkpoint yet, start it
    run = _fresh_run(cfg, config_path)
    if any((run / CHECKPOINTS).glob("ckpt-*.pt")):  # a fresh start would overwrite its checkpoints
        raise UsageError(f"{run} already has checkpoints; continue it with --resume auto, "
                         f"or start a new run with another log.run_name")
    return RunPlan(run, None)


LOCK_NAME = ".lock"


def lock_run(run_dir: Path) -> Optional[int]:
    """Take the run's lock (an flock on <run>/.lock) for this process's lifetime; return its file
    descriptor, to be kept open. Two trainings in one run would overwrite each other's checkpoints.

    The kernel drops the lock when the process dies, however it dies, so a preempted run never
    leaves a stale lock for its requeued job. A filesystem without flock gets a warning, no lock.
    """
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"{run_dir} is in use by another training ({holder}); wait for it to end, "
                         "or start this one with another log.run_name") from None
    except OSError as e:  # e.g. ENOLCK on an NFS mount without a lock daemon
        warnings.warn(f"{run_dir}: cannot lock the run ({e.strerror}); do not start two trainings in it",
                      stacklevel=2)
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def plan_run(cfg: Config, config_path: Optional[str]) -> RunPlan:
    """Decide on rank 0 where the run lives and which checkpoint it resumes; share it with every
    rank. Writes nothing. An error on rank 0 is raised on every rank, so none is left waiting."""
    return dist.on_main(lambda: _plan(cfg, config_path))


def claim_run_dir(cfg: Config, run_dir: Path) -> Optional[int]:
    """Rank 0 creates the run dir, locks it (lock_run) and writes config.yaml; a refusal there stops
    every rank (dist.on_main). Returns the lock's fd on rank 0 (keep it open), None elsewhere."""
    def claim() -> Optional[int]:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run(run_dir)
        save_config(cfg, run_dir / "config.yaml")  # after the lock: never over a running run's
        return lock
    lock = dist.on_main(claim)
    return lock if dist.is_main() else None
