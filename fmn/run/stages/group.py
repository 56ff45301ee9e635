"""Several concepts re-steered in one batched pass (manifest `defaults.train_together`).

Each concept still gets its own patch, the one it would get alone (fmn.train.resteer_batch), in
its own folder, with its own resteer stage key recorded next to it: a later run, in a
group of other concepts or alone, reuses a patch whose key still matches instead of
training it again, so adding a concept to a manifest trains only that concept.
"""

from __future__ import annotations

import json
from pathlib import Path

from fmn.run.folder import ProgressFile, RunPaths
from fmn.run.stages.common import (
    base_spec,
    check_record,
    drop_pipeline,
    pipeline,
    preserve_list,
    stage_key,
)
from fmn.run.stages.concept import _prepared, _read_ti
from fmn.run.stages.records import GroupRecord, PatchRecord, PrepRecord, TIRecord

LOG_FILE = "resteer.json"


def _reusable(rp: RunPaths, concept_id: str, key: str) -> PatchRecord | None:
    """The record of a patch this stage already made from the same inputs, if intact."""
    from fmn.model.patch import patch_hash

    where = rp.patch(concept_id)
    try:
        log = json.loads((where / LOG_FILE).read_text())
    except (OSError, ValueError):
        return None
    path = where / str(log.get("patch", ""))
    if log.get("key") != key or not path.is_file() or patch_hash(path) != log.get("hash"):
        return None
    return {"concept": concept_id, "hash": log["hash"], "outputs": {rp.rel(path): log["hash"]}}


def _save(rp: RunPaths, concept_id: str, res, key: str) -> PatchRecord:
    from fmn.io import write_json
    from fmn.model.patch import patch_hash, save_patch

    where = rp.patch(concept_id)
    path = save_patch(res.patch, where)
    digest = patch_hash(path)
    log = {"concept": concept_id, "key": key, "patch": path.name, "hash": digest}
    write_json(where / LOG_FILE, {**log, **res.log(), "together": True})
    return {"concept": concept_id, "hash": digest, "outputs": {rp.rel(path): digest}}


def _train(pipe, m, rp: RunPaths, ids: list[str], preps: list[PrepRecord], tis: list) -> list:
    """Each concept's ForgetResult, or the ResteerError that stopped it (NotForgotten where
    the closed loop failed it)."""
    from fmn.train.forget import check_forgotten, resteer_prepared, resteer_prepared_batch
    from fmn.train.resteer import ResteerConfig, ResteerError

    rs = [m.resolve(cid) for cid in ids]
    for cid, prep in zip(ids, preps, strict=True):
        check_record(rp, prep, f"prepared data of {cid!r}")
    cfgs = [ResteerConfig.from_options(r.type, r.resteer) for r in rs]
    datas = [_prepared(pipe, r, rp) for r in rs]
    learned = [_read_ti(rp.abs(next(iter(t["outputs"])))) if t else None for t in tis]
    ticks = [ProgressFile(rp, cid) for cid in ids]
    kw = {"preserve": preserve_list(m)}
    try:
        results = resteer_prepared_batch(
            pipe,
            datas,
            cfgs,
            tis=learned,
            masks=[r.mask for r in rs],
            # one loss for the whole pass: shown as such on every member's row
            progress=lambda stage, done, total, info: [
                tick(stage, done, total, {"group_loss": info["loss"]} if "loss" in info else {})
                for tick in ticks
            ],
            **kw,
        )
    except ResteerError:  # one concept diverged: one at a time, so that it fails alone
        out = []
        for d, c, ti, r, tick in zip(datas, cfgs, learned, rs, ticks, strict=True):
            try:
                out.append(resteer_prepared(pipe, d, c, ti=ti, mask=r.mask, progress=tick, **kw))
            except ResteerError as e:
                out.append(e)
        return out
    out = []
    for res in results:
        try:
            out.append(check_forgotten(res))
        except ResteerError as e:
            out.append(e)
    return out


def stage_resteer_group(
    manifest: Path | str,
    concept_ids: list[str],
    run: Path | str,
    preps: list[PrepRecord],
    tis: list[TIRecord | None],
) -> GroupRecord:
    """Re-steer `concept_ids` together -> patches/<id>/delta.safetensors each. Returns
    {"concepts": [one stage_resteer record per concept, or {"concept", "error"}],
    "outputs": every patch}; "reused": true marks a patch kept from an earlier run."""
    from fmn.io import write_json
    from fmn.manifest import load_manifest
    from fmn.train.loop import NotForgotten

    m, rp = load_manifest(manifest), RunPaths(Path(run))
    keys = {
        cid: stage_key(
            "resteer", {"manifest": manifest, "concept_id": cid, "run": run, "prep": p, "ti": t}
        )
        for cid, p, t in zip(concept_ids, preps, tis, strict=True)
    }
    records: dict[str, PatchRecord] = {}
    for cid in concept_ids:
        rec = _reusable(rp, cid, keys[cid])
        if rec is not None:
            records[cid] = {**rec, "reused": True}
    todo = [i for i, cid in enumerate(concept_ids) if cid not in records]
    if todo:
        ids = [concept_ids[i] for i in todo]
        with pipeline(base_spec(m)) as pipe:
            results = _train(pipe, m, rp, ids, [preps[i] for i in todo], [tis[i] for i in todo])
        if any(tis[i] for i in todo):
            drop_pipeline()  # as stage_resteer: the learned tokens touched the text encoder
        for cid, res in zip(ids, results, strict=True):
            if isinstance(res, NotForgotten):  # as stage_resteer: the log says why, no patch
                log = {"concept": cid, **res.result.log(), "together": True}
                write_json(rp.patch(cid) / LOG_FILE, log)
            if isinstance(res, Exception):
                records[cid] = {"concept": cid, "error": f"{type(res).__name__}: {res}"}
            else:
                records[cid] = _save(rp, cid, res, keys[cid])
    ordered = [records[cid] for cid in concept_ids]
    outputs = {k: v for r in ordered for k, v in r.get("outputs", {}).items()}
    return {"concepts": ordered, "outputs": outputs}
