"""Checkpoints that survive preemption: atomic save, newest-valid discovery, retention, safe load.

A run costs GPU-days, so the rules are strict:

* A reader only ever sees complete files. A checkpoint is written to a hidden temp file in the
  same directory, fsynced, read back, and only then ``os.replace``d to ``ckpt-{step:09d}.pt``;
  the directory is fsynced so the rename itself survives a node crash.
* Loading never executes code: every load goes through ``torch.load(weights_only=True)``.
* Nothing is deleted on suspicion: a corrupt file is skipped with a warning, never removed.

On-disk layout of a checkpoint directory::

    ckpt-000001000.pt        regular checkpoints; the newest ``keep_last`` are kept
    ckpt-best.pt             hard link (or copy) of the best checkpoint by ``best_metric``
    best.json                {"metric", "mode", "step", "value", "file"} for ckpt-best.pt
    .ckpt-....tmp-PID-HEX    a write in progress, or left by a killed writer; removed by the next save

Each ``.pt`` file holds ``{"schema_version": int, "metadata": dict, "state": dict}``.
Which rank saves is the caller's decision; nothing here knows about distributed training.
"""
from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import time
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch

from dgan import __version__
from dgan.atomic import link_or_copy_atomic, torch_save_atomic, write_text_atomic
from dgan.errors import DganError, one_line

SCHEMA_VERSION = 1

BEST_NAME = "ckpt-best.pt"
BEST_JSON = "best.json"
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_TMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")
_REQUIRED_KEYS = ("schema_version", "metadata", "state")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format; dgan never writes the legacy format
_UNSAFE_GLOBAL_RE = re.compile(r"GLOBAL (\S+) was not an allowed global|module (\S+) is blocked")
# Generic on purpose: sample and evaluate have no --resume; dgan.train adds its own fallback hint.
_FIX_HINT = "pass another checkpoint"


class CheckpointError(DganError, RuntimeError):
    """A checkpoint cannot be written or read; the one-line message says what to do."""


class CheckpointSchemaError(CheckpointError):
    """The checkpoint was written by a newer dgan; falling back to an older one would lose work."""


# --------------------------------------------------------------------------- loading


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    if mmap:
        try:
            # mmap reads only the pickle and the zip directory: validating a 2 GB file stays cheap.
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except Exception:  # noqa: BLE001 - some filesystems cannot mmap; a plain read decides
            pass
    return torch.load(path, map_location=map_location, weights_only=True)


def _read_raw(path: Path, map_location: Any, mmap: bool) -> Any:
    """torch.load(weights_only=True) with every failure turned into a one-line CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or {_FIX_HINT}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}; check its permissions") from e
    if magic != _ZIP_MAGIC:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (not a torch zip archive); {_FIX_HINT}"
        )
    try:
        return _torch_load(path, map_location, mmap)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL_RE.search(str(e))
        what = (found.group(1) or found.group(2)) if found else one_line(e, 80)
        raise CheckpointError(
            f"{path} was NOT loaded: it contains arbitrary code/objects ({what}) that "
            "torch.load(weights_only=True) refuses; dgan never writes these, so do not trust this file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({one_line(e, 100)}); {_FIX_HINT}"
        ) from e


def _validate(obj: Any, path: Path, expected_schema: int) -> dict:
    if (not isinstance(obj, dict) or any(k not in obj for k in _REQUIRED_KEYS)
            or not isinstance(obj["metadata"], dict) or not isinstance(obj["state"], dict)):
        have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a dgan checkpoint (needs keys {list(_REQUIRED_KEYS)}, has {have}); "
            "pass a ckpt-*.pt written by dgan.train"
        )
    version = obj["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} has a non-integer schema_version {version!r}; it is not a dgan checkpoint")
    if version > expected_schema:
        writer = obj["metadata"].get("dgan_version", "unknown")
        raise CheckpointSchemaError(
            f"{path} has checkpoint schema {version} but this dgan reads up to schema {expected_schema}; "
            f"it was written by dgan {writer}: install dgan>={writer} to load it"
        )
    return obj


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", expected_schema: int = SCHEMA_VERSION
) -> dict:
    """Load `{"schema_version", "metadata", "state"}` without ever executing pickled code."""
    path = Path(path)
    return _validate(_read_raw(path, map_location, mmap=False), path, expected_schema)


def _check_loadable(path: Path) -> None:
    _validate(_read_raw(path, "cpu", mmap=True), path, SCHEMA_VERSION)


def _find_unloadable(obj: Any, where: str) -> str | None:
    """Name the first value weights_only=True would refuse, to make a save error actionable."""
    plain = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device)
    if isinstance(obj, torch.Tensor) or type(obj) in plain:
        return None
    if type(obj) in (dict, OrderedDict, Counter):
        for key, value in obj.items():
            bad = _find_unloadable(value, f"{where}[{key!r}]")
            if bad:
                return bad
        return None
    if type(obj) in (list, tuple, set, torch.Size):
        for i, value in enumerate(obj):
            bad = _find_unloadable(value, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}"


def _dgan_version() -> str:
    return str(__version__) or "unknown"


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves, finds and prunes checkpoints in one directory. Call `save` on one rank only."""

    def __init__(
        self,
        ckpt_dir: str | Path,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
    ) -> None:
        if keep_last < 1:
            raise CheckpointError(f"keep_last={keep_last} would delete every checkpoint; use keep_last >= 1")
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode={best_mode!r} is not valid; use 'min' (e.g. FID) or 'max'")
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._warned_future = False

    def path_for(self, step: int) -> Path:
        return self.ckpt_dir / f"ckpt-{step:09d}.pt"

    def list(self) -> list[Path]:
        """Regular checkpoints sorted by step (temp files and ckpt-best.pt excluded)."""
        return [p for _, p in self._regular()]

    def _regular(self) -> list[tuple[int, Path]]:
        if not self.ckpt_dir.is_dir():
            return []
        found = []
        for entry in self.ckpt_dir.iterdir():
            match = _CKPT_RE.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def save(self, state: dict, *, step: int, metadata: dict, metric: float | None = None) -> Path:
        """Write ckpt-{step}.pt atomically, then update the best copy and prune old checkpoints."""
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"step={step!r} must be a non-negative int")
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        meta = {"dgan_version": _dgan_version(), "step": step, **metadata}
        payload = {"schema_version": SCHEMA_VERSION, "metadata": meta, "state": state}
        final = self.path_for(step)
        torch_save_atomic(payload, final, lambda tmp: self._verify_written(tmp, payload, step))
        # Best before pruning: ckpt-best.pt must hold its own link before the regular file can go.
        self._update_best(final, step, metric)
        self._prune(step)
        return final

    def _verify_written(self, tmp: Path, payload: dict, step: int) -> None:
        # Reading back is what turns "torch.save returned" into "a resume can load this".
        try:
            _check_loadable(tmp)
        except CheckpointError as e:
            offender = _find_unloadable(payload, "checkpoint")
            reason = (
                f"{offender}, which torch.load(weights_only=True) refuses; convert it to tensors/lists/dicts"
                if offender
                else str(e)
            )
            raise CheckpointError(f"not saving step {step}: {reason}") from e

    def _remove_stale_temps(self) -> None:
        for entry in self.ckpt_dir.iterdir():
            if _TMP_RE.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def _prune(self, saved_step: int) -> None:
        regular = self._regular()
        older = [p for s, p in regular if s < saved_step]
        newer = [p for s, p in regular if s > saved_step]
        if newer and not self._warned_future:
            # Left by an abandoned timeline (e.g. we resumed from an older checkpoint because the
            # newest was corrupt). Not ours to delete; the user may want to inspect them.
            self._warned_future = True
            warnings.warn(
                f"{len(newer)} checkpoint(s) in {self.ckpt_dir} are newer than step {saved_step} "
                f"(e.g. {newer[0].name}); they are left in place and not counted by keep_last",
                stacklevel=3,
            )
        # The checkpoint just written always survives; keep_last - 1 older ones join it.
        doomed = older[: max(0, len(older) - (self.keep_last - 1))]
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _read_best(self) -> dict | None:
        path = self.ckpt_dir / BEST_JSON
        if not path.exists():
            return None
        try:
            best = json.loads(path.read_text(encoding="utf-8"))
            value = float(best["value"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            warnings.warn(f"ignoring unreadable {path} ({one_line(e, 80)}); the next metric becomes best")
            return None
        if best.get("metric") != self.best_metric or best.get("mode") != self.best_mode:
            warnings.warn(
                f"{path} tracks {best.get('metric')}/{best.get('mode')}, not "
                f"{self.best_metric}/{self.best_mode}; the next metric replaces it"
            )
            return None
        best["value"] = value
        return best

    def _update_best(self, final: Path, step: int, metric: float | None) -> None:
        if self.best_metric is None or metric is None:
            return
        metric = float(metric)
        if math.isnan(metric):
            warnings.warn(f"{self.best_metric} is NaN at step {step}; not considered for {BEST_NAME}")
            return
        best = self._read_best()
        if best is not None:
            better = metric < best["value"] if self.best_mode == "min" else metric > best["value"]
            if not better:
                return
        link_or_copy_atomic(final, self.ckpt_dir / BEST_NAME)
        record = {"metric": self.best_metric, "mode": self.best_mode, "step": step,
                  "value": metric, "file": final.name}
        write_text_atomic(self.ckpt_dir / BEST_JSON, json.dumps(record, indent=2) + "\n")

    def latest_valid(self) -> Path | None:
        """Newest regular checkpoint that loads; corrupt ones are warned about and skipped, not deleted."""
        for path in reversed(self.list()):
            try:
                _check_loadable(path)
                return path
            except CheckpointSchemaError:
                raise  # falling back past a newer-dgan checkpoint would silently discard work
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
        return None

    def load(self, path: str | Path, map_location: Any = "cpu") -> dict:
        return load_checkpoint(path, map_location=map_location)


class SavePolicy:
    """When a training run saves: every `every_kimg` thousand images, every `every_min` minutes of
    wall clock, at the end, on a stop signal, and with each periodic evaluation (so the best
    checkpoint can follow its metric). One instance per rank; every rank must reach the same
    verdict, so the time test goes through the caller's all-rank agreement (see `time_due`)."""

    def __init__(self, every_kimg: float, every_min: float) -> None:
        self.every_images = max(1, round(every_kimg * 1000))
        self.every_min = every_min
        self._last = time.monotonic()

    def time_due(self) -> bool:
        """This rank's clock alone: agree on it across ranks before passing it to `due`."""
        return (time.monotonic() - self._last) / 60 >= self.every_min

    def due(self, images_before: int, images_after: int, *, last: bool, stop: bool,
            evaluated: bool, time_due: bool) -> bool:
        crossed = images_before // self.every_images != images_after // self.every_images
        return last or stop or evaluated or time_due or crossed

    def saved(self) -> None:
        self._last = time.monotonic()
