"""Stage cache keys computed from the imports (fmn.code_key): an edit to a module a stage's
code imports (directly, inside a function, through other modules) makes that stage run
again; an edit anywhere else does not. Edits are made to copies of the source tree, never
to the real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fmn import code_key as ck
from fmn.run.stages.common import stage_code, stage_key
from tests.flow_helpers import ROOT, run_flow, write_manifest

STAGES = ["prepare", "invert", "resteer", "resteer_group", "merge", "score"]
RESTEER_ON = {"resteer", "resteer_group", "merge"}  # what re-steering code shapes


def _copy_tree(to: Path) -> Path:
    """The fmn, tasks and flows sources (no assets), as a source root for code keys."""
    skip = shutil.ignore_patterns("assets", "__pycache__", "*.pyc")
    for package in ("fmn", "tasks", "flows"):
        shutil.copytree(ROOT / package, to / package, ignore=skip)
    return to


def _edited(src: Path, module_path: str, to: Path) -> Path:
    """A copy of the source root `src` with one module edited (copied from the copy, not
    from the working tree, which may change in between)."""
    shutil.copytree(src, to)
    path = to / module_path
    path.write_text(path.read_text() + "\n# edited\n")
    return to


def test_stage_closures_follow_lazy_and_indirect_imports() -> None:
    merge = ck.closure(stage_code("merge"))
    # imported inside functions of fmn.merge.fuse, and through fmn.train.judge
    assert {
        "fmn.train.judge",
        "fmn.merge.anchor_check",
        "fmn.train.resteer",
        "fmn.code_key",
    } <= set(merge)
    score = ck.closure(stage_code("score"))
    # the detectors are imported lazily by fmn.eval.mscore.detectors; the world classifier too
    detectors = {"fmn.eval.mscore.face", "fmn.eval.mscore.clip", "fmn.eval.mscore.nudenet"}
    assert {*detectors, "fmn.world.classifier", "fmn.world.concepts"} <= set(score)
    assert "fmn.model.attention" in ck.closure("fmn.data.prepare")  # through fmn.data.masks
    prepare = set(ck.closure(stage_code("prepare")))
    assert {
        "fmn.data.prepare",
        "fmn.model.attention",
        "fmn.run.stages.concept",
        "fmn.run.stages",
    } <= prepare
    # fmn/run/stages/__init__.py re-exports every stage: hashed, but not followed
    assert (
        not {"fmn.run.stages.merge", "fmn.run.stages.audit", "fmn.merge.fuse", "fmn.eval.audit"}
        & prepare
    )
    # stage_resteer's imports, in the same file, are not stage_prepare's
    assert not {"fmn.train.forget", "fmn.train.resteer_batch"} & prepare


def test_closure_resolves_relative_and_submodule_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "fmn"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from fmn import unused\n")
    (pkg / "unused.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\nfrom ..d import thing\n")
    (pkg / "sub" / "c.py").write_text("")
    (pkg / "d.py").write_text("thing = 1\n")
    got = ck.closure("fmn.a", tmp_path)
    assert got == ("fmn", "fmn.a", "fmn.d", "fmn.sub", "fmn.sub.b", "fmn.sub.c")
    (pkg / "e.py").write_text("import fmn.sub\n")  # a package imported itself: followed
    assert "fmn.unused" in ck.closure("fmn.e", tmp_path)


@pytest.fixture
def stage_params(tmp_path: Path) -> dict[str, dict]:
    """Parameters each stage's task could be called with (inputs made up, held fixed)."""
    manifest = str(write_manifest(tmp_path / "m.yaml", ["carol", "triangle"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "patch.safetensors").write_bytes(b"a merged patch")
    common, prep = {"manifest": manifest, "run": str(run)}, {"key": "prep-key"}
    concept = {**common, "concept_id": "carol"}
    return {
        "prepare": concept,
        "invert": {**concept, "prep": prep},
        "resteer": {**concept, "prep": prep, "ti": None},
        "resteer_group": {
            **common,
            "concept_ids": ["carol", "triangle"],
            "preps": [prep, prep],
            "tis": [None, None],
        },
        "merge": {**common, "patches": [{"concept": "carol", "hash": "sha256:x"}]},
        "score": {**common, "audited": {"patch": "patch.safetensors"}},
    }


def _keys(monkeypatch, src: Path, params: dict[str, dict]) -> dict[str, str]:
    monkeypatch.setattr(ck, "SOURCE_ROOT", src)
    return {s: stage_key(s, params[s]) for s in STAGES}


@pytest.mark.parametrize(
    ("edited", "rerun"),
    [
        ("fmn/merge/anchor_check.py", {"merge"}),  # only the merge reaches it
        ("fmn/train/judge.py", {"merge", *RESTEER_ON}),  # fmn.merge.fuse (lazily), the loop
        ("fmn/train/resteer_batch.py", RESTEER_ON),
        ("fmn/train/invert.py", {"invert", *RESTEER_ON, "score"}),  # not prepare
        (
            "fmn/model/attention.py",
            set(STAGES),
        ),  # fmn.data.prepare -> fmn.data.masks -> fmn.model.attention
        ("fmn/run/stages/group.py", {"resteer_group"}),
        ("fmn/run/stages/__init__.py", set(STAGES)),  # runs before any stage module
        ("fmn/world/train.py", set()),  # builds the world; no stage does
        ("fmn/cli.py", set()),  # the command line starts builds; no stage imports it
    ],
)
def test_editing_a_module_reruns_the_stages_that_import_it(
    tmp_path: Path, monkeypatch, stage_params, edited: str, rerun: set[str]
) -> None:
    src = _copy_tree(tmp_path / "before")
    before = _keys(monkeypatch, src, stage_params)
    # the same code in another folder: the same keys (a moved checkout keeps its caches)
    assert before == _keys(monkeypatch, shutil.copytree(src, tmp_path / "moved"), stage_params)
    after = _keys(monkeypatch, _edited(src, edited, tmp_path / "after"), stage_params)
    assert {s for s in STAGES if before[s] != after[s]} == rerun


def test_prep_cache_key_follows_the_code(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path / "before")
    before = ck.code_key("fmn.data.prepare", src)
    # the mask code (MTCNN faces, attention maps) makes prep's masks; the face detector
    # only measures audits, and the merge has nothing to do with prep
    masks = _edited(src, "fmn/data/masks.py", tmp_path / "a")
    assert ck.code_key("fmn.data.prepare", masks) != before
    for i, other in enumerate(("fmn/eval/mscore/face.py", "fmn/merge/fuse.py")):
        edited = _edited(src, other, tmp_path / f"b{i}")
        assert ck.code_key("fmn.data.prepare", edited) == before, other


def test_flow_reruns_only_the_stage_whose_code_changed(prefect_api, tmp_path, monkeypatch) -> None:
    """What a user sees: after an edit to fmn/merge/anchor_check.py, the next build merges again
    and reuses every concept's prepared data and patch."""
    manifest = write_manifest(tmp_path / "one.yaml", ["triangle"])
    src = _copy_tree(tmp_path / "before")
    monkeypatch.setattr(ck, "SOURCE_ROOT", src)
    first, _ = run_flow(manifest, tmp_path / "run")
    assert first["concepts"] == {"triangle": "trained"}
    monkeypatch.setattr(
        ck, "SOURCE_ROOT", _edited(src, "fmn/merge/anchor_check.py", tmp_path / "after")
    )
    again, states = run_flow(manifest, tmp_path / "run")
    assert again["concepts"] == {"triangle": "cached"}, states
    assert states["prepare-triangle"] == states["resteer-triangle"] == "Cached", states
    assert again["stages"]["merge"] != "cached", again
