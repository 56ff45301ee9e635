"""The merge stage: every concept's patch -> one merged patch, LoRA and model folder."""

from __future__ import annotations

from pathlib import Path

from fmn.io import write_json
from fmn.manifest import GENERATED_IMAGES, Manifest, load_manifest
from fmn.run.folder import ProgressFile, RunPaths, tree_hash
from fmn.run.stages.common import base_spec, check_record, pipeline, preserve_list
from fmn.run.stages.records import MergeRecord, PatchRecord

MERGED_RECORD = "merged.json"  # beside merged/, which write_merged replaces whole


def stage_merge(manifest: Path | str, run: Path | str, patches: list[PatchRecord]) -> MergeRecord:
    """Merge the given patches (stage_resteer records, hashes checked first) as the
    manifest's `merge` says, into <run>/merged/. With `merge.method: joint` the concepts
    are instead re-steered together in one run here (fmn.train.forget.forget_joint), and
    `patches` is empty. Also records the merged model's fingerprint, so that the model
    folder can be checked later (`fmn.model.load.fingerprint` of it must match).
    Concepts the manifest erases by their gates (`erase: gate`; a correction's gate is a
    route to its guide) are fitted here, together (fmn.model.eraser), and written beside
    the merged patch."""
    from fmn.merge.fuse import merge_patches, write_merged
    from fmn.merge.gates import fit, gated_inputs
    from fmn.merge.similar import widened
    from fmn.model import eraser as gates
    from fmn.model.load import fingerprint
    from fmn.model.patch import apply_patch, revert_patch

    m, rp = load_manifest(manifest), RunPaths(Path(run))
    for p in patches:
        check_record(rp, p, f"patch of {p['concept']!r}")
    tick = ProgressFile(rp, "merge")
    with pipeline(base_spec(m)) as pipe:
        gated = [r for r in m.resolved_concepts() if r.erase == "gate"]
        if m.merge.method == "joint":
            result = _joint(pipe, m, rp, tick)
        elif not patches:  # every concept is gated: the merged patch changes nothing
            result = _nothing(pipe)
        else:
            files = [rp.abs(next(iter(p["outputs"]))) for p in patches]
            result = merge_patches(
                pipe,
                files,
                _merge_config(m),
                preserve=preserve_list(m),
                progress=tick,
            )
        eraser = None
        if gated:
            concepts, guides = gated_inputs(gated)
            eraser = fit(
                pipe,
                concepts,
                widen=widened(concepts),
                guides=guides,
                lock=m.merge.robust,
                anchors=dict(m.merge.anchors),
                preserve=preserve_list(m),
                progress=tick,
            )
        tick("writing model", 0, 1)
        record = write_merged(pipe, result, rp.merged, eraser=eraser)
        apply_patch(pipe, result.patch)
        try:
            with gates.applied(pipe, eraser):
                model_fingerprint = fingerprint(pipe)
        finally:
            revert_patch(pipe, result.patch)
    out: MergeRecord = {
        "merged": rp.rel(rp.merged),
        "model": rp.rel(rp.merged / "model"),
        "concepts": [c["id"] for c in record["concepts"]],
        "patch_hash": record["patch_hash"],
        "model_fingerprint": model_fingerprint,
        "outputs": {rp.rel(rp.merged): tree_hash(rp.merged)},
    }
    write_json(rp.root / MERGED_RECORD, out)
    tick("merged", 1, 1)
    return out


def _merge_config(m: Manifest):
    from fmn.merge.fuse import MergeConfig

    return MergeConfig.from_manifest(m.merge)


def _nothing(pipe):
    """A MergeResult whose patch changes no weight."""
    from fmn.merge.fuse import MergeResult
    from fmn.model.load import fingerprint
    from fmn.model.patch import Patch

    patch = Patch("", "merge:none", {}, base_fingerprint=fingerprint(pipe), extra={"concepts": []})
    return MergeResult(patch=patch, seconds=0.0)


def _joint(pipe, m: Manifest, rp: RunPaths, tick):
    """One re-steering run over every concept (the original's multi-concept mode), as a
    MergeResult. It draws its own images (the largest `generate` of the concepts), with
    no masks: fmn.train.forget.forget_joint is the baseline it was written for."""
    from fmn.merge.fuse import MergeResult
    from fmn.train.forget import forget_joint
    from fmn.train.resteer import ResteerConfig

    rs = m.resolved_concepts()
    cfgs = [ResteerConfig.from_options(r.type, r.resteer) for r in rs]
    patch = forget_joint(
        pipe,
        [(r.id, r.type, r.words) for r in rs],
        cfgs,
        generate=max(r.generate or GENERATED_IMAGES for r in rs),
        preserve=preserve_list(m),
        cache_dir=rp.prep,
        progress=tick,
    )
    patch.extra["concepts"] = [
        {"id": r.id, "weight": 1.0, "hash": "", "method": patch.method} for r in rs
    ]
    return MergeResult(patch=patch, seconds=float(patch.extra.get("seconds", 0.0)))
