"""Atomic file writes: write a temp file beside the target, then rename over it, so a
crash never leaves a half-written output (a rename is atomic on one filesystem)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temp path in dest's folder; on success it replaces dest, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: Path | str, obj: object) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(dest: Path | str, writer: Callable[[Path], object]) -> None:
    """Atomically write dest with writer(tmp_path), e.g. `lambda p: img.save(p, format="PNG")`."""
    with atomic_path(dest) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temp folder beside dest; on success it replaces dest whole, on error it is
    removed. Readers see the old folder or the new one, never a half-written one (the old
    one is moved aside first, then deleted, so the gap is two renames long)."""
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
