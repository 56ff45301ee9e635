"""The audit stages: score (M-Scores of the audited model next to its baseline, kept in
the run folder) and report (the report folder people and DVC read).

They are two stages so that the expensive half (generating and scoring images) is cached
while the report is rewritten every run. Between them the audit travels as files:
rows.json, summary.json, prompts.json and images.safetensors (uint8 image tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

from fmn.io import atomic_dir, write_json
from fmn.manifest import load_manifest
from fmn.run.folder import ProgressFile, RunPaths, tree_hash
from fmn.run.stages.common import base_spec, check_record, patch_file
from fmn.run.stages.records import Audited, ReportRecord, ScoreRecord

IMAGES_FILE = "images.safetensors"


def mark_failed(summary: dict, failed: dict[str, str]) -> dict:
    """Concepts that failed to train (on_error: skip) fail the gates, by name and why,
    whatever their M-Score says."""
    for cid, why in failed.items():
        summary["concepts"].get(cid, {})["status"] = "failed"
        summary["gates"]["failures"].append(
            {
                "concept": cid,
                "gate": "trained",
                "value": None,
                "limit": None,
                "message": f"target {cid!r} was not forgotten: its training failed ({why})",
            }
        )
    summary["gates"]["passed"] = not summary["gates"]["failures"]
    summary["failed"] = dict(failed)
    return summary


def mark_loops(summary: dict, rp: RunPaths) -> dict:
    """Each trained target's closed-loop outcome, from its resteer.json ("forgotten after
    70 steps (rung 2 of 4: ...)", "stopped: 'alice' moved ..."), for the report."""
    for cid, c in summary["concepts"].items():
        log = rp.patch(cid) / "resteer.json"
        if c.get("role") == "target" and log.is_file():
            loop = json.loads(log.read_text()).get("loop")
            if loop:
                c["loop"] = {k: loop[k] for k in ("status", "reason", "rung", "steps")}
    return summary


def mark_gates(summary: dict, rp: RunPaths) -> dict:
    """Each gated concept's gate (its reach, the nearest other prompt's distance, and
    whether robust mode was on, from the merge's merge.json), for the report."""
    merge = rp.merged / "merge.json"
    record = json.loads(merge.read_text()) if merge.is_file() else {}
    for g in record.get("gated", []):
        if g["id"] in summary["concepts"]:
            gate = {k: g[k] for k in ("radius", "nearest", "reason")}
            summary["concepts"][g["id"]]["gate"] = gate | {"robust": record.get("robust", False)}
    return summary


def stage_score(
    manifest: Path | str,
    run: Path | str,
    audited: Audited,
    failed: dict[str, str] | None = None,
) -> ScoreRecord:
    """Audit a model against the manifest's base model. `audited` names it: {"model":
    a model spec or folder} or {"patch": a patch file}, relative paths from the run
    folder; a stage_merge record also carries "outputs", checked first."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from fmn.eval.audit import audit

    m, rp = load_manifest(manifest), RunPaths(Path(run))
    if "outputs" in audited:
        check_record(rp, audited, "merged model")
    tick = ProgressFile(rp, "audit")
    target = {}
    if "patch" in audited:
        target["patch"] = patch_file(rp.abs(audited["patch"]))
    else:
        local = rp.abs(audited["model"])
        target["model"] = str(local) if local.exists() else audited["model"]
    res = audit(m, baseline=base_spec(m), out=None, progress=tick, **target)
    summary = mark_gates(mark_loops(mark_failed(res.summary, failed or {}), rp), rp)
    images = {
        f"{model}/{cid}": torch.from_numpy(np.ascontiguousarray(arr))
        for model, by_concept in res.images.items()
        for cid, arr in by_concept.items()
    }
    with atomic_dir(rp.audit) as tmp:
        write_json(tmp / "rows.json", res.rows)
        write_json(tmp / "prompts.json", res.prompts)
        save_file(images, str(tmp / IMAGES_FILE))
        write_json(tmp / "summary.json", summary)
    tick("scored", 1, 1)
    return {
        "audit": rp.rel(rp.audit),
        "passed": summary["gates"]["passed"],
        "outputs": {rp.rel(rp.audit): tree_hash(rp.audit)},
    }


def stage_report(run: Path | str, scored: ScoreRecord, out: Path | str) -> ReportRecord:
    """Write the report folder `out` (fmn.eval.report) from a stage_score record."""
    from safetensors.torch import load_file

    from fmn.eval.report import write_report
    from fmn.eval.result import AuditResult

    rp, out = RunPaths(Path(run)), Path(out).resolve()
    check_record(rp, scored, "audit")
    folder = rp.abs(scored["audit"])
    summary = json.loads((folder / "summary.json").read_text())
    images: dict[str, dict] = {}
    for key, tensor in load_file(str(folder / IMAGES_FILE)).items():
        model, cid = key.split("/", 1)
        images.setdefault(model, {})[cid] = tensor.numpy()
    result = AuditResult(
        summary,
        json.loads((folder / "rows.json").read_text()),
        images,
        json.loads((folder / "prompts.json").read_text()),
    )
    write_report(out, result)
    return {
        "report": str(out),
        "index": str(out / "index.html"),
        "passed": summary["gates"]["passed"],
        "failures": [f["message"] for f in summary["gates"]["failures"]],
        "summary": summary,
    }
