"""A run folder: where one manifest's build writes, the lock that keeps a second run out
of it, content hashes of a build's inputs and outputs (cache keys, integrity checks), and
live progress files that a console can follow whatever process does the work.

    <run>/prep/<id>/<key>/     per-concept prep cache (fmn.data.prepare)
    <run>/ti/<id>/             ti.safetensors (textual inversion)
    <run>/patches/<id>/        delta.safetensors + resteer.json
    <run>/merged/              delta.safetensors, lora.safetensors, model/, merge.json
    <run>/audit/               rows, summary, prompts and images of the audit
    <run>/progress/<key>.json  what each concept (or stage) is doing now
    <run>/.prefect/, dask/     the orchestrator's cache records and scratch space

Nothing here imports Prefect.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fmn.io import write_json

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of a run writes, under one root folder."""

    root: Path

    @property
    def prep(self) -> Path:
        return self.root / "prep"

    def ti(self, concept_id: str) -> Path:
        return self.root / "ti" / concept_id

    @property
    def patches(self) -> Path:
        return self.root / "patches"

    def patch(self, concept_id: str) -> Path:
        return self.patches / concept_id

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def progress(self) -> Path:
        return self.root / "progress"

    @property
    def results(self) -> Path:
        return self.root / ".prefect" / "results"

    @property
    def dask(self) -> Path:
        return self.root / "dask"

    def rel(self, path: Path | str) -> str:
        """`path` relative to the root (records stay valid when the folder moves)."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def abs(self, path: Path | str) -> Path:
        return self.root / path


def default_paths(name: str, out: str | Path | None, report: str | Path | None):
    """(run folder, report folder) of a build: build/<name> and reports/<name> by
    default; with only `out` given the report goes inside it (<out>/report), so two runs
    with different outs never share a report."""
    run = Path(out) if out else Path("build") / name
    rep = Path(report) if report else (run / "report" if out else Path("reports") / name)
    return run.resolve(), rep.resolve()


# ---------------------------------------------------------------------------------------
# Lock


class RunLockedError(RuntimeError):
    """Another process is writing the same run folder."""


_held: dict[Path, list] = {}  # lock file -> [fd, depth]: re-entrant within a process
_held_guard = threading.Lock()


@contextmanager
def run_lock(root: Path | str) -> Iterator[Path]:
    """Hold `<root>/.lock` for the duration: a second process that asks for it fails at
    once with RunLockedError. An flock, not a marker file: the kernel drops it when the
    holder dies (even by SIGKILL), so a crashed run never blocks its own re-run.
    Re-entrant within a process (the CLI takes it, then the flow it starts)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"{root} is being written by another run ({holder}); wait for it to "
                    "finish, or pass another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            _held[path] = [fd, 1]
    try:
        yield root
    finally:
        with _held_guard:
            _held[path][1] -= 1
            if _held[path][1] == 0:
                fd = _held.pop(path)[0]
                os.ftruncate(fd, 0)
                os.close(fd)  # closing releases the flock


def sweep_stale_temp(folder: Path | str, prefix: str = ".") -> list[Path]:
    """Delete what killed writers left behind under `folder`: the temp files and folders of
    fmn.io's atomic writes (`.<name>.<random>.tmp`) and folders moved aside for replacement
    (`.<name>.old.<pid>`). Call it only while holding the folder's run lock, when no other
    writer can be mid-write. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [
        p
        for p in folder.rglob(f"{prefix}*")
        if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old." in p.name)
    ]
    removed = []
    for p in sorted(stale, key=lambda q: len(q.parts)):  # parents first
        if not p.exists() and not p.is_symlink():
            continue  # inside a folder removed already
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------
# Hashes


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path | str) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within a process."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _file_hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _file_hashes[memo] = "sha256:" + h.hexdigest()
    return _file_hashes[memo]


def tree_hash(path: Path | str) -> str:
    """Hash of a file, or of a folder's files (relative names and contents; hidden
    names and __pycache__ left out)."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            h.update(f"{rel.as_posix()}\0{file_hash(f)}\n".encode())
    return "sha256:" + h.hexdigest()


def intact(root: Path, outputs: dict[str, str]) -> bool:
    """True when every output (path relative to `root` -> hash) exists with its hash."""
    try:
        return all(tree_hash(root / rel) == digest for rel, digest in outputs.items())
    except OSError:
        return False


def canonical_hash(obj: object) -> str:
    """sha256 of the canonical JSON of a plain value."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Progress


class ProgressFile:
    """progress(stage, done, total, metrics) -> `<run>/progress/<key>.json`, written
    atomically and at most a few times a second (a console polls these files, so progress
    shows the same whether the work runs in threads or in Dask workers)."""

    def __init__(self, run: RunPaths, key: str, every: float = 0.5) -> None:
        self.path = run.progress / f"{key}.json"
        self.every, self.last = every, 0.0

    def __call__(self, stage: str, done: int, total: int, metrics: dict | None = None) -> None:
        now = time.time()
        if now - self.last < self.every and 0 < done < total:
            return
        self.last = now
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        record = {"stage": stage, "done": done, "total": total, "metrics": metrics}
        write_json(self.path, {**record, "time": now})


def read_progress(run: RunPaths) -> dict[str, dict]:
    """Every progress file of a run, by key (files being replaced are skipped)."""
    out = {}
    for f in sorted(run.progress.glob("*.json")) if run.progress.is_dir() else []:
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    return out
