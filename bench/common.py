"""Shared helpers of the performance benchmarks (bench/resteer.py, scale.py, sd15.py): peak
memory, machine description, and writing a result as JSON plus a markdown table."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Resident memory of this process now, MiB (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    """Peak resident memory of this process so far, MiB (getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Peak resident memory while the block runs, sampled every 5 ms in a thread.
    `.mb` is the peak above the RSS at entry; `.peak` the absolute peak."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def mb(self) -> float:
        return self.peak - self.start


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        # what benches write (their partial rows and results) is no change to the code
        outputs = [":!bench/partial", ":!bench/results"]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def machine(threads: int | None = None) -> dict:
    import torch

    info = {
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_results(out: Path, result: dict, table: str, title: str) -> None:
    """result -> out (.json), and `title` + the machine line + `table` -> out with .md."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result.get("machine", {})
    head = (
        f"# {title}\n\n{m.get('cpu', '')}, {m.get('threads', '?')} thread(s), "
        f"torch {m.get('torch', '?')}, commit {result.get('commit', '?')}, {m.get('date', '')}\n\n"
    )
    out.with_suffix(".md").write_text(head + table)


def crowd_world(threads: int):
    """(commit, pipeline, world detector, world) of a crowd-world bench, with every fmn
    module imported first, so the code measured is the commit recorded even if HEAD moves
    while the bench runs."""
    import torch

    torch.set_num_threads(threads)
    import fmn.merge.gates
    import fmn.merge.similar
    import fmn.train.correct
    import fmn.train.forget  # noqa: F401
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.model.load import embedded_path, load_pipeline
    from fmn.world.concepts import CROWD

    commit = git_commit()
    pipe = load_pipeline(f"embedded:{CROWD.name}")
    return commit, pipe, WorldDetector(embedded_path(CROWD.name) / "classifier"), CROWD


# Finished rows of the long resumable benches (single, words, correct, mass), one file
# each. Tracked in git: a bench that outlasts a session (single's plan is about 8 hours on
# 2 CPU cores) resumes from a clean checkout, which has no build/. Each row carries the
# commit it ran on.
PARTIALS = ROOT / "bench" / "partial"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a bench's resumable partial file (none if it is not there yet)."""
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def append_jsonl(path: Path, record: dict) -> None:
    """One more finished record of a resumable bench."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def touched(pipe, gates, concepts, prompts: int) -> list:
    """The concepts (ConceptRef-like: id, type, text) whose first `prompts` audit prompts
    the eraser `gates` changes: every other one draws the base model's images bit for bit."""
    import torch

    from fmn.eval.mscore.prompts import concept_prompts
    from fmn.model import eraser
    from fmn.model.conditioning import encode_text

    said = {c.id: concept_prompts(c.text, c.type, prompts) for c in concepts}
    flat = [p for ps in said.values() for p in ps]
    before = encode_text(pipe, flat).embeds
    with eraser.applied(pipe, gates):
        after = encode_text(pipe, flat).embeds
    out, k = [], 0
    for c in concepts:
        n = len(said[c.id])
        if not torch.equal(before[k : k + n], after[k : k + n]):
            out.append(c)
        k += n
    return out
