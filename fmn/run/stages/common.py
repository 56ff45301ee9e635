"""What every stage shares: the cache-key inputs of each stage, the base model (loaded
once per process), and the check that an upstream output is still what its stage made.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmn.code_key import code_key
from fmn.manifest import Manifest, ResolvedConcept, load_manifest
from fmn.run.folder import RunPaths, canonical_hash, file_hash, intact, tree_hash
from fmn.run.stages.records import Audited, MergeRecord, PatchRecord, PrepRecord, TIRecord


class StageInputError(RuntimeError):
    """An input file changed or vanished after the stage that made it ran."""


# ---------------------------------------------------------------------------------------
# Models: one loaded pipeline per process, used by one stage at a time


_pipes: dict[str, object] = {}
_pipe_lock = threading.Lock()


@contextmanager
def pipeline(spec: str) -> Iterator:
    """The base pipeline, loaded once per process and lent to one stage at a time (stages
    that change it restore it; one that fails drops it, in case it could not)."""
    import torch

    from fmn.model.load import load_pipeline

    with _pipe_lock:
        if spec not in _pipes:
            _pipes.clear()
            device = "cuda" if torch.cuda.is_available() else "cpu"
            _pipes[spec] = load_pipeline(spec, device=device)
        try:
            yield _pipes[spec]
        except BaseException:
            _pipes.clear()
            raise


def drop_pipeline() -> None:
    """Forget the loaded pipeline (after a stage that loaded and unloaded learned tokens:
    the next stage starts from the files, not from a tokenizer that was resized twice)."""
    with _pipe_lock:
        _pipes.clear()


def base_spec(m: Manifest) -> str:
    """The manifest's base model; a relative path starts at the manifest's folder."""
    spec = m.base_model
    if spec.startswith("embedded:") or Path(spec).expanduser().is_absolute():
        return spec
    local = m.base_dir / spec
    return str(local) if local.exists() else spec


def model_key(spec: str) -> str:
    """Content hash of a model's files (stands in for fmn.model.load.fingerprint without
    loading it; patches still check the real fingerprint when merged). A hub id, which
    cannot be read offline, is keyed by its name."""
    from fmn.model.load import embedded_path

    path = embedded_path(spec.split(":", 1)[1]) if spec.startswith("embedded:") else Path(spec)
    return tree_hash(path) if path.expanduser().exists() else f"spec:{spec}"


def concept_spec(r: ResolvedConcept) -> dict:
    return {
        "id": r.id,
        "type": r.type,
        "text": r.text,
        **({"words": list(r.words)} if len(r.words) > 1 else {}),  # old keys stay valid
        "generate": r.generate,
        "images": tree_hash(r.images) if r.images is not None else None,
        "mask": tree_hash(r.mask) if isinstance(r.mask, Path) else r.mask,
        "seed": r.resteer.seed,
    }


def preserve_list(m: Manifest) -> list[tuple[str, str]]:
    return [(p.text, p.type) for p in m.preserve]


def _audited_key(run: Path, audited: Audited) -> str:
    if "patch" in audited:
        return file_hash(patch_file(run / audited["patch"]))
    spec = str(run / audited["model"]) if (run / audited["model"]).exists() else audited["model"]
    return model_key(spec)


def patch_file(path: Path) -> Path:
    from fmn.model.patch import PATCH_FILE

    return path / PATCH_FILE if path.is_dir() else path


def stage_inputs(stage: str, params: dict) -> dict:
    """Everything a stage's result depends on, from the parameters its task is called
    with: the basis of its cache key. Manifest edits that do not touch a concept leave
    that concept's keys alone."""
    m = load_manifest(params["manifest"])
    base = {"stage": stage, "code": code_key(stage_code(stage))}
    base["base"] = model_key(base_spec(m))
    cid = params.get("concept_id")
    r = m.resolve(cid) if cid else None
    if stage == "prepare":
        return {**base, "concept": concept_spec(r)}
    if stage == "invert":
        return {**base, "prep": params["prep"]["key"], "invert": r.invert.model_dump(mode="json")}
    if stage == "resteer":
        ti = params.get("ti")
        return {
            **base,
            "prep": params["prep"]["key"],
            "resteer": r.resteer.model_dump(mode="json"),
            "preserve": preserve_list(m),
            "ti": ti["outputs"] if ti else None,
        }
    if stage == "resteer_group":  # its members' own resteer keys
        members = zip(params["concept_ids"], params["preps"], params["tis"], strict=True)
        return {
            **base,
            "members": [
                stage_inputs("resteer", {**params, "concept_id": c, "prep": p, "ti": t})
                for c, p, t in members
            ],
        }
    if stage == "merge":
        out = {**base, "merge": m.merge.model_dump(mode="json"), "preserve": preserve_list(m)}
        out["patches"] = [[p["concept"], p["hash"]] for p in params["patches"]]
        if m.merge.method == "joint":  # trains too: every concept's spec and options count
            rs = m.resolved_concepts()
            out["concepts"] = [[concept_spec(r), r.resteer.model_dump(mode="json")] for r in rs]
        return out
    if stage == "score":
        run = Path(params["run"])
        return {
            **base,
            "evaluate": m.evaluate.model_dump(mode="json"),
            "concepts": [[c.id, c.type, c.text] for c in m.concepts],
            "preserve": [[c.id, c.type, c.text] for c in m.preserve],
            "audited": _audited_key(run, params["audited"]),
            "failed": params.get("failed") or {},
        }
    raise ValueError(f"no stage {stage!r}")


def stage_key(stage: str, params: dict) -> str:
    return canonical_hash(stage_inputs(stage, params))


def stage_code(stage: str) -> str:
    """The code behind a stage, as a fmn.code_key root: its function `stage_<name>` as
    fmn.run.stages exports it (code_key finds the module that defines it). Its code key covers
    every fmn module that function's static imports reach: an edit to one of them
    invalidates the stage's cached results (and, through their hashes, everything
    downstream); an edit elsewhere leaves them. Computed, so no list of modules can fall
    behind the imports. (A name, not an import: importing fmn.run.stages here would put every
    stage's code into every stage's key.)"""
    return f"{__package__}:stage_{stage}"


def check_record(
    run: RunPaths, record: PrepRecord | TIRecord | PatchRecord | MergeRecord | Audited, what: str
) -> None:
    if not intact(run.root, record["outputs"]):
        raise StageInputError(
            f"{what}: {', '.join(record['outputs'])} in {run.root} changed or vanished after "
            "the stage that made it ran; run the build again to remake it"
        )
