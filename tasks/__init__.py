"""Prefect tasks: one per stage, each a thin wrapper over one fmn.run.stages function. The
only layer that knows caching, retries, tags, the device slot and artifacts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fmn.run.folder import RunPaths


def for_run(run: Path | str) -> SimpleNamespace:
    """The stage tasks with their results persisted in `run`'s folder (its cache)."""
    from tasks.invert import invert
    from tasks.merge import merge
    from tasks.prepare import prepare
    from tasks.report import report
    from tasks.resteer import resteer
    from tasks.resteer_group import resteer_group
    from tasks.score import score

    storage = RunPaths(Path(run)).results
    cached = {t.name: t.with_options(result_storage=storage) for t in (prepare, invert, resteer)}
    cached |= {t.name: t.with_options(result_storage=storage) for t in (merge, score)}
    cached["resteer_group"] = resteer_group.with_options(result_storage=storage)
    return SimpleNamespace(**cached, report=report)
