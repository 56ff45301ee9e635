"""The audit flow: any model (or a patch on the baseline) -> M-Score report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

import tasks
from fmn.manifest import load_manifest
from fmn.run.folder import run_lock
from tasks.slots import ensure_device_slot


@flow(name="audit")
def audit(
    manifest: str,
    model: str | None = None,
    patch: str | None = None,
    out: str | None = None,
    run: str | None = None,
) -> dict:
    """Score `model` (a spec or folder), or `patch` applied to the manifest's base model,
    against that base on the manifest's concepts; write the report to `out` (default
    reports/<name>-audit). The scores are cached in `run` (default build/<name>-audit)."""
    if (model is None) == (patch is None):
        raise ValueError("give a model or a patch to audit")
    m = load_manifest(manifest)
    run_dir = Path(run or Path("build") / f"{m.name}-audit").resolve()
    out_dir = Path(out or Path("reports") / f"{m.name}-audit").resolve()
    if patch is not None:
        audited = {"patch": str(Path(patch).resolve())}
    else:  # a local folder or file by absolute path; anything else is a model spec
        audited = {"model": str(Path(model).resolve()) if Path(model).exists() else model}
    with run_lock(run_dir):
        ensure_device_slot()
        t = tasks.for_run(run_dir)
        scored = t.score.submit(str(Path(manifest).resolve()), str(run_dir), audited).result()
        return t.report.submit(str(run_dir), scored, str(out_dir)).result()
