"""Per-concept stages: prepare -> (textual inversion) -> re-steer -> a patch file."""

from __future__ import annotations

from pathlib import Path

from fmn.manifest import ResolvedConcept, load_manifest
from fmn.run.folder import ProgressFile, RunPaths, file_hash
from fmn.run.stages.common import (
    base_spec,
    check_record,
    drop_pipeline,
    pipeline,
    preserve_list,
)
from fmn.run.stages.records import PatchRecord, PrepRecord, TIRecord


def _prepared(pipe, r: ResolvedConcept, run: RunPaths):
    from fmn.data.prepare import prepare_resolved

    return prepare_resolved(pipe, r, mask=r.mask, cache_dir=run.prep)


def stage_prepare(manifest: Path | str, concept_id: str, run: Path | str) -> PrepRecord:
    """Images, masks, latents and text conditioning of one concept, into the prep cache."""
    from fmn.data.prepare import CACHE_FILE, RECORD_FILE

    m, rp = load_manifest(manifest), RunPaths(Path(run))
    r = m.resolve(concept_id)
    tick = ProgressFile(rp, concept_id)
    tick("prepare", 0, 1)
    with pipeline(base_spec(m)) as pipe:
        data = _prepared(pipe, r, rp)
    key = data.record["key"]
    where = rp.prep / concept_id / key[:16]
    tick("prepared", 1, 1)
    return {
        "concept": concept_id,
        "key": key,
        "images": len(data.latents),
        "outputs": {rp.rel(where / f): file_hash(where / f) for f in (CACHE_FILE, RECORD_FILE)},
    }


def stage_invert(
    manifest: Path | str, concept_id: str, run: Path | str, prep: PrepRecord
) -> TIRecord:
    """Textual inversion of one concept from its prepared latents -> ti.safetensors."""
    from fmn.train.invert import InvertConfig, invert, save_ti

    m, rp = load_manifest(manifest), RunPaths(Path(run))
    r = m.resolve(concept_id)
    cfg = InvertConfig.from_options(r.invert, r.resteer.seed)  # as fmn.train.forget.forget_resolved
    tick = ProgressFile(rp, concept_id)
    with pipeline(base_spec(m)) as pipe:
        data = _prepared(pipe, r, rp)  # a cache hit: stage_prepare made it
        ti = invert(
            pipe,
            data.latents,
            f"<{concept_id}>",
            cfg,
            r.type,
            progress=lambda d, t, loss: tick("inversion", d, t, {"loss": loss}),
            masks=data.masks,  # the concept's mask (manifest `mask:`) limits the loss too
        )
    path = save_ti(ti, rp.ti(concept_id) / "ti.safetensors")
    return {"concept": concept_id, "outputs": {rp.rel(path): file_hash(path)}}


def _read_ti(path: Path):
    """A TI file back as a TIResult (what re-steering through learned tokens needs)."""
    import json

    from safetensors import safe_open

    from fmn.train.invert import SDXL_KEYS, InvertConfig, TIResult, load_ti

    tensors = load_ti(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    family = meta["family"]
    if family == "sdxl":
        vectors = {name: tensors[key] for name, key in SDXL_KEYS.items()}
    else:
        vectors = {"text_encoder": tensors[meta["token"]]}
    return TIResult(
        token=meta["token"],
        vectors=vectors,
        losses=[],
        config=InvertConfig(**json.loads(meta["config"])),
        family=family,
        base_fingerprint=meta["base_fingerprint"],
    )


def stage_resteer(
    manifest: Path | str,
    concept_id: str,
    run: Path | str,
    prep: PrepRecord,
    ti: TIRecord | None = None,
) -> PatchRecord:
    """Attention re-steering of one concept (or its correction, with `action: correct`)
    -> patches/<id>/delta.safetensors."""
    from fmn.io import write_json
    from fmn.model.patch import patch_hash, save_patch
    from fmn.train.correct import correct_resolved
    from fmn.train.forget import resteer_prepared
    from fmn.train.loop import NotForgotten
    from fmn.train.resteer import ResteerConfig

    m, rp = load_manifest(manifest), RunPaths(Path(run))
    r = m.resolve(concept_id)
    cfg = ResteerConfig.from_options(r.type, r.resteer)  # as fmn.train.forget.forget_resolved
    learned = None
    if ti is not None:
        check_record(rp, ti, f"textual inversion of {concept_id!r}")
        learned = _read_ti(rp.abs(next(iter(ti["outputs"]))))
    with pipeline(base_spec(m)) as pipe:
        data = _prepared(pipe, r, rp)
        try:
            if r.action == "correct":
                res = correct_resolved(
                    pipe, r, data, preserve=preserve_list(m), progress=ProgressFile(rp, concept_id)
                )
            else:
                res = resteer_prepared(
                    pipe,
                    data,
                    cfg,
                    ti=learned,
                    preserve=preserve_list(m),
                    mask=r.mask,
                    progress=ProgressFile(rp, concept_id),
                )
        except NotForgotten as e:  # the log says why; no patch is written
            log = {"concept": concept_id, **e.result.log()}
            write_json(rp.patch(concept_id) / "resteer.json", log)
            raise
    if learned is not None:
        drop_pipeline()
    where = rp.patch(concept_id)
    path = save_patch(res.patch, where)
    write_json(where / "resteer.json", {"concept": concept_id, **res.log()})
    digest = patch_hash(path)
    return {"concept": concept_id, "hash": digest, "outputs": {rp.rel(path): digest}}
