"""Atomic file writes: a reader only ever sees a complete file, old or new, never half of one.

Each write goes to a hidden temp file in the same directory (same filesystem, so the rename is
atomic), is fsynced, and is then ``os.replace``d into place; the directory is fsynced too, so the
rename itself survives a node crash. Used for checkpoints, manifests, reports and extractors.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Optional

import torch


def tmp_path(final: Path) -> Path:
    # Hidden and suffixed, so discovery (ckpt-N.pt) never sees it; pid+random keep writers apart.
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(directory: Path) -> None:
    """Make renames/creations in `directory` durable, not just the file contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        # Some network filesystems refuse fsync on a directory; they commit renames anyway.
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def publish(tmp: Path, final: Path) -> None:
    """Atomically rename a complete, fsynced temp file into place."""
    try:
        os.replace(tmp, final)
    finally:
        # rename(2) is a silent no-op when both names are links to one inode; don't leave tmp behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(final.parent)


def write_atomic(final: Path, write: Callable[[IO[bytes]], None],
                 verify: Optional[Callable[[Path], None]] = None) -> Path:
    """`write(f)` into a temp file, fsync, `verify(tmp)` if given, then publish it as `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
    except BaseException:
        # An exception (disk full, bad state) must not strand a multi-GB temp file. A SIGKILL
        # can still leave one; the next checkpoint save removes it.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    publish(tmp, final)
    return final


def torch_save_atomic(payload: Any, final: Path, verify: Optional[Callable[[Path], None]] = None) -> Path:
    return write_atomic(final, lambda f: torch.save(payload, f), verify)


def write_text_atomic(final: Path, text: str) -> Path:
    return write_atomic(final, lambda f: f.write(text.encode("utf-8")))


def link_or_copy_atomic(src: Path, final: Path) -> None:
    tmp = tmp_path(final)
    try:
        os.link(src, tmp)  # free in disk space and instant
    except OSError:
        # Some shared filesystems refuse hard links; a copy costs disk but is just as safe.
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
    publish(tmp, final)
