"""Concept correction (`action: correct`): the manifest's rules, the training that makes a
word draw its guide, a merge that keeps it, and an audit that reports whom the word draws.

On tiny-world, "a photo of carol" is corrected towards alice and bob (prompts, drawn in
turn): the audit measures carol's images as alice and as bob, and no target gate applies."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fmn.cli import app
from fmn.data.prepare import prepare_concept
from fmn.eval.audit import audit
from fmn.eval.result import correction_lines
from fmn.manifest import ManifestError, parse_manifest
from fmn.merge.fuse import MergeConfig, merge_patches
from fmn.model.load import load_pipeline
from fmn.model.patch import save_patch
from fmn.train.correct import CorrectConfig, correct_prepared
from fmn.world import EMBEDDED_NAME

GUIDE = {"prompts": ["a photo of alice", "a photo of bob"], "concepts": ["alice", "bob"]}
CAROL = {"id": "carol", "type": "id", "action": "correct", "guide": GUIDE}
PICTURES = Path(__file__).resolve().parents[1] / "docs" / "worlds"  # a folder of images


def _manifest(concepts, **extra):
    doc = {"name": "correct-test", "base_model": EMBEDDED_NAME, "concepts": concepts, **extra}
    return parse_manifest(yaml.safe_load(yaml.safe_dump(doc)), base_dir=".")


@pytest.mark.parametrize(
    "concept, extra, where, message",
    [
        (
            {"id": "carol", "type": "id", "action": "correct"},
            {},
            "concepts.0.guide",
            "needs a guide",
        ),
        ({"id": "carol", "type": "id", "guide": GUIDE}, {}, "concepts.0.guide", "only used with"),
        (
            {**CAROL, "guide": {"prompts": ["x"], "images": str(PICTURES)}},
            {},
            "concepts.0.guide",
            "either",
        ),
        (CAROL, {"merge": {"method": "joint"}}, "concepts.0.action", "jointly|with the others"),
        ({**CAROL, "images": {"generate": 4}}, {}, "concepts.0.images", "guide's images"),
        ({**CAROL, "invert": {"enabled": True}}, {}, "concepts.0.invert", "no textual inversion"),
        (
            {**CAROL, "guide": {"images": str(PICTURES)}, "erase": "gate"},
            {},
            "concepts.0.erase",
            "a folder has none",
        ),
    ],
)
def test_a_correction_needs_a_guide_and_nothing_that_would_undo_it(
    concept, extra, where, message
) -> None:
    with pytest.raises(ManifestError, match=rf"{where}: .*({message})"):
        _manifest([concept], **extra)


def test_guide_prompts_are_routed_and_guide_images_trained_by_default() -> None:
    assert _manifest([CAROL]).resolve("carol").erase == "gate"
    pictures = {**CAROL, "guide": {"images": str(PICTURES)}}
    assert _manifest([pictures]).resolve("carol").erase == "resteer"


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    pipe = load_pipeline(EMBEDDED_NAME)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def corrected(world, tmp_path_factory) -> Path:
    """carol corrected towards alice and bob (a short run: 60 steps, ~4 s)."""
    data = prepare_concept(world, "carol", "id", "carol", generate=8, draw_from=GUIDE["prompts"])
    assert data.record["source"]["from"] == GUIDE["prompts"]  # drawn from the guide
    res = correct_prepared(world, data, CorrectConfig(steps=60), guide=GUIDE)
    assert res.patch.method == "correct"
    assert all(k.endswith(("to_k.weight", "to_v.weight")) for k in res.patch.deltas)
    return save_patch(res.patch, tmp_path_factory.mktemp("carol"))


def test_fmn_forget_routes_a_word_to_its_guides_and_the_audit_reports_whom_it_draws(
    tmp_path,
) -> None:
    """The default for guide prompts: a route (a gate that puts each guide's words in the
    word's place in turn), written by `fmn forget` and audited as a patch folder."""
    out = tmp_path / "carol"
    args = ["forget", "--id", "carol", "--type", "id", "--out", str(out), "--threads", "1"]
    args += ["--correct-to", "a photo of alice", "--correct-to", "a photo of bob"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "routed" in run.output and "replaced in turn by 'alice', 'bob'" in run.output
    assert json.loads((out / "gate.json").read_text())["reason"].startswith("routed")
    m = _manifest(
        [CAROL],
        preserve=[{"id": "dots", "type": "style"}],
        evaluate={"prompts_per_concept": 2, "seeds": [0, 1], "steps": 15},
    )
    res = audit(m, patch=out, out=tmp_path / "report")
    carol = res.summary["concepts"]["carol"]
    assert carol["role"] == "correct"
    assert carol["shares_base"] == {"alice": 0.0, "bob": 0.0}  # the base draws carol
    # now alice and bob in turn, each about half of the images
    assert carol["guides_drawn"] == 2 and carol["dominant_over_fair"] <= 1.5
    assert carol["shares"]["alice"] + carol["shares"]["bob"] >= 0.75
    assert carol["ratio"] < 0.5  # no longer drawn as carol herself
    assert res.summary["concepts"]["dots"]["ratio"] == pytest.approx(1.0)  # bit-exact
    (line,) = correction_lines(res.summary)  # what `fmn audit` and `fmn run` print
    assert line.startswith("carol: drawn most as") and "2 of 2 guide concepts drawn" in line
    gates = res.summary["gates"]
    assert not [f for f in gates["failures"] if f["concept"] == "carol"]  # no target gate
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Drawn as each guide concept" in html


def test_a_trained_correction_holds_the_concepts_listed_as_preserved(world, corrected) -> None:
    """A user who lists a neighbour under `preserve:` (or `fmn forget --preserve`) keeps
    its prompts' keys and values nearer where they were: a trained correction moves them
    less than when nobody listed it (same seed and data; the preservation term).
    bench/correct.py's resteer-kept rows show what that does to a neighbour's images."""
    from fmn.model.conditioning import encode_text
    from fmn.model.patch import load_patch

    def moved(deltas: dict) -> float:  # relative change of dave's keys and values
        states = encode_text(world, ["a photo of dave"]).embeds[0].float()
        weights = dict(world.unet.named_parameters())
        change = [
            (states @ d.float().T).norm() / (states @ weights[k.removeprefix("unet.")].T).norm()
            for k, d in deltas.items()
        ]
        return float(torch.stack(change).mean())

    data = prepare_concept(world, "carol", "id", "carol", generate=8, draw_from=GUIDE["prompts"])
    kept = correct_prepared(
        world, data, CorrectConfig(steps=60), guide=GUIDE, preserve=[("dave", "id")]
    ).patch
    assert kept.config["preserve"] == [["dave", "id"]]  # recorded in the patch
    alone = moved(load_patch(corrected).deltas)
    assert alone > 0.01  # nobody listed dave: the correction moves him
    assert moved(kept.deltas) < 0.8 * alone


def test_fmn_forget_hints_to_list_neighbours_when_a_trained_correction_keeps_none(
    tmp_path, monkeypatch
) -> None:
    from fmn.train import correct

    short = correct.CorrectConfig.from_options
    monkeypatch.setattr(  # a few steps: the hint is what is tested, not the training
        correct.CorrectConfig, "from_options", lambda o: replace(short(o), steps=3, generate=2)
    )
    args = ["forget", "--id", "carol", "--type", "id", "--threads", "1", "--erase", "resteer"]
    args += ["--correct-to", "a photo of alice"]
    alone = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "alone")])
    assert alone.exit_code == 0, alone.output
    assert "corrected towards its guide in 3 steps" in alone.output
    assert "nothing was listed as preserved" in alone.output and "--preserve" in alone.output
    kept = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "kept"), "--preserve", "dave:id"]
    )
    assert kept.exit_code == 0, kept.output
    assert "nothing was listed as preserved" not in kept.output


def test_the_merge_keeps_a_correction_even_with_the_erase_term(world, corrected) -> None:
    from fmn.model.patch import load_patch

    patch = load_patch(corrected)
    plain = merge_patches(world, [patch], MergeConfig()).kept["carol"]
    erased = merge_patches(world, [patch], MergeConfig(erase_weight=30.0)).kept["carol"]
    assert erased == pytest.approx(plain, abs=1e-6)


def test_fmn_forget_correct_to_refuses_a_folder_with_prompts(tmp_path) -> None:
    folder = tmp_path / "guide"
    folder.mkdir()
    args = ["forget", "--id", "carol", "--type", "id", "--out", str(tmp_path / "o")]
    run = CliRunner().invoke(app, [*args, "--correct-to", str(folder), "--correct-to", "x"])
    assert run.exit_code == 2 and "one folder of guide images, or prompts" in run.output
    run = CliRunner().invoke(app, [*args, "--correct-to", str(folder)])
    assert run.exit_code == 2 and "--correct-to: folder" in run.output  # it has no images
    assert not (tmp_path / "o").exists()


def test_fmn_run_stages_correct_a_concept_and_log_it(tmp_path) -> None:
    """The run's per-concept stages of a re-steered correction: prepare draws the guide's
    images (not the word's), the re-steering stage trains it and writes its patch and log."""
    from fmn.model.patch import load_patch
    from fmn.run.stages import stage_prepare, stage_resteer

    doc = {
        "name": "correct-stages",
        "base_model": EMBEDDED_NAME,
        "defaults": {"correct": {"steps": 2, "generate": 2}, "erase": "resteer"},
        "concepts": [CAROL],
    }
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    run = tmp_path / "run"
    prep = stage_prepare(manifest, "carol", run)
    assert prep["images"] == 2
    got = stage_resteer(manifest, "carol", run, prep)
    patch = load_patch(run / "patches" / "carol")
    assert patch.method == "correct" and patch.config["guide"]["concepts"] == ["alice", "bob"]
    log = json.loads((run / "patches" / "carol" / "resteer.json").read_text())
    assert len(log["losses"]) == 2 and log["attention_before"] is None
    assert got["hash"].startswith("sha256:")
