"""Finding shards: manifests, glob/brace patterns -> a ShardSet with per-shard sample counts, and the
keyed cache folder that built-in sources (phantoms, an npz) are written to once."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dgan.data.shards import FORMAT, MANIFEST_NAME
from dgan.data.sources import DataError


def load_manifest(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing manifest {path}: shards must be written by `python -m dgan.data.shards` "
                        "(it writes manifest.json next to the tars)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(f"unreadable manifest {path} ({exn}); re-run python -m dgan.data.shards") from exn
    if manifest.get("format") != FORMAT or "splits" not in manifest:
        raise DataError(f"{path} is not a dgan shard manifest; re-run python -m dgan.data.shards")
    return manifest



def expand_pattern(pattern: str, what: str = "data.shards") -> list[Path]:
    """Glob and/or brace pattern -> sorted existing files; a clear error if nothing matches."""
    import glob

    import braceexpand

    paths: list[str] = []
    for part in braceexpand.braceexpand(os.path.expanduser(pattern)):
        found = sorted(glob.glob(part))
        if not found and not glob.has_magic(part) and "{" in pattern:
            raise DataError(f"{what}: shard {part} (from the pattern {pattern}) does not exist; "
                            "fix the brace range to match the files written")
        paths.extend(found)
    if not paths:
        raise DataError(f"{what}: the pattern {pattern} matches no files; check the path "
                        "(shards are written by python -m dgan.data.shards --output DIR)")
    return sorted(dict.fromkeys(Path(p) for p in paths))



@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...]        # samples per shard, from the manifest
    manifest: dict

    @property
    def total(self) -> int:
        return sum(self.counts)



def resolve_shards(pattern: str, what: str = "data.shards") -> ShardSet:
    """The shards a pattern names, with their sample counts from the manifest next to them."""
    paths = expand_pattern(pattern, what)
    folders = {p.parent for p in paths}
    if len(folders) > 1:
        raise DataError(f"{what}: {pattern} spans {len(folders)} folders; keep one shard set (one manifest) per pattern")
    manifest_path = paths[0].parent / MANIFEST_NAME
    manifest = load_manifest(manifest_path)
    known = {s["name"]: s["count"] for split in manifest["splits"].values() for s in split["shards"]}
    counts = []
    for path in paths:
        if path.name not in known:
            raise DataError(f"{what}: {path} is not listed in {manifest_path}; "
                            "point the pattern at shards written with that manifest")
        counts.append(known[path.name])
    return ShardSet(tuple(str(p) for p in paths), tuple(counts), manifest)



def cached_shards(cache_dir: Path, name: str, key: dict, build: Callable[[Path], None],
                  wait_s: float = 600.0) -> Path:
    """Return cache_dir/<name>-<hash(key)>, building it with `build(out_dir)` if absent.

    `build` writes through `write_shards`, whose final rename is atomic, so a reader only
    ever sees a complete folder. A lock file lets one process build while the others (the
    other ranks) wait. A lock whose owner is gone (same host, dead pid; or older than
    wait_s) is taken over: building twice is safe, the atomic rename keeps one copy.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache_dir) / f"{name}-{digest}"
    if (final / MANIFEST_NAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.parent / f".{final.name}.lock"
    while not (final / MANIFEST_NAME).is_file():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_is_stale(lock, wait_s):
                _remove(lock)
            time.sleep(0.2)
            continue
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            os.close(fd)
            if not (final / MANIFEST_NAME).is_file():
                build(final)
        except (DataError, OSError):
            # another process renamed its copy in first: ours is discarded by write_shards
            if not (final / MANIFEST_NAME).is_file():
                raise
        finally:
            _remove(lock)
    return final



def _lock_is_stale(lock: Path, wait_s: float) -> bool:
    try:
        host, pid = lock.read_text().split()
        age_s = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False  # just created and not written yet, or already gone
    if age_s > wait_s:
        return True
    if host != socket.gethostname():
        return False  # cannot see another machine's processes; rely on the age
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True   # its builder was killed
    except PermissionError:
        pass          # alive, owned by someone else
    return False



def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
