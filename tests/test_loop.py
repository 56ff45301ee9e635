"""The closed re-steering loop (fmn.train.loop): the rungs it climbs, the verdicts it acts
on, and, on the embedded world, a neighbour it catches that the fixed recipe destroyed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from fmn.manifest import type_defaults, type_ladder
from fmn.model.load import embedded_path, load_pipeline
from fmn.train import loop as L
from fmn.train.judge import Judged
from fmn.train.resteer import resteer_config_for
from fmn.world import EMBEDDED_NAME
from fmn.world.concepts import TINY


def test_the_first_rung_is_the_fixed_recipe_and_hand_set_options_pin_the_loop() -> None:
    for kind in ("id", "object", "style", "nsfw"):
        first = type_ladder(kind)[0]
        assert first == {k: type_defaults(kind)[k] for k in first}, kind
    assert resteer_config_for("style").rungs == type_ladder("style")
    assert resteer_config_for("id", preserve_weight=2.0).rungs == [{}]  # judged, not searched
    assert resteer_config_for("id", loop=False).rungs == []  # one plain re-steer


def _verdict(share: float, moved=(), base: float = 1.0) -> L.Verdict:
    watched = {m: {"base": 1.0, "patched": 0.0, "kv": 0.3} for m in moved}
    margin = -0.01 if share <= L.GONE_SHARE else 0.01
    return L.Verdict(
        share <= L.GONE_SHARE, list(moved), Judged(share, margin), Judged(base, 0.01), watched
    )


def _climb(monkeypatch, verdicts: list[L.Verdict]) -> L.Loop:
    """Walk an identity's ladder with these verdicts, one per rung judged."""
    given = iter(verdicts)
    monkeypatch.setattr(L, "judge_patch", lambda *a, **k: next(given))
    walk = L.Loop(resteer_config_for("id"))
    data = SimpleNamespace(text="bob", words=("bob",), concept_type="id")
    while not walk.done:
        result = SimpleNamespace(patch=None, resteer=SimpleNamespace(seconds=2.0))
        walk.judge(None, result, data, [])
    return walk


def test_a_concept_still_drawn_goes_to_the_next_rung_until_it_is_gone(monkeypatch) -> None:
    walk = _climb(monkeypatch, [_verdict(1.0), _verdict(0.0)])
    rec = walk.record()
    assert rec["status"] == "forgotten" and rec["rung"] == 2 and rec["steps"] == 70
    assert rec["reason"].startswith("forgotten after 70 steps (rung 2 of 4")
    assert [h["positions"] for h in rec["history"]] == ["concept", "concept+eot"]


def test_a_watched_concept_that_moves_stops_the_loop_by_name(monkeypatch) -> None:
    walk = _climb(monkeypatch, [_verdict(1.0), _verdict(0.0, moved=["alice"])])
    rec = walk.record()
    assert rec["status"] == "failed" and rec["rung"] == 2
    assert "'alice' moved at rung 2 of 4" in rec["reason"] and "nothing shipped" in rec["reason"]


def test_the_last_rung_still_drawing_it_fails_and_an_unrecognised_concept_is_unjudged(
    monkeypatch,
) -> None:
    walk = _climb(monkeypatch, [_verdict(1.0)] * 4)
    assert walk.record()["status"] == "failed"
    assert walk.record()["reason"].startswith("still drawn after 140 steps")
    walk = _climb(monkeypatch, [_verdict(1.0, base=0.25)])
    assert walk.record()["status"] == "unjudged" and walk.record()["rung"] == 1


def test_a_word_the_model_draws_as_the_concept_goes_with_it_instead_of_stopping_it(
    monkeypatch,
) -> None:
    """ "dark" draws the night the concept's words draw: its images moving is the point, so
    it is listed as a phrasing, not watched; "dots" keeps its own look and is watched."""
    changed = [("dark", "style", 0.9), ("dots", "style", 0.5)]
    monkeypatch.setattr(L, "most_changed", lambda *a, **k: changed)
    monkeypatch.setattr(L, "recognised", lambda *a, **k: True)
    own = {"dark": 0.25, "dots": 1.0}  # share of each word's images the base model gives it

    def judged(pipe, patch, concepts, **k):
        if len(concepts) == 2 and concepts[1][0] == ("night", "midnight"):  # phrasing_of
            return {concepts[0][0]: Judged(own[concepts[0][0]], 0.0)}
        gone = patch is not None
        return {t: Judged(0.0 if gone else 1.0, -0.02 if gone else 0.01) for t, _ in concepts}

    monkeypatch.setattr(L, "self_judged", judged)
    v = L.judge_patch(SimpleNamespace(text_encoder=torch.nn.Linear(1, 1)), SimpleNamespace(),
                      ("night", "midnight"), "style")  # fmt: skip
    assert v.phrasings == ["dark"] and list(v.watched) == ["dots"]
    assert v.gone and v.moved == ["dots"]


def test_a_bare_config_is_one_plain_resteer(tiny) -> None:
    from fmn.train.forget import forget_concept
    from fmn.train.resteer import ResteerConfig

    res = forget_concept(tiny, "bob", "id", "bob", ResteerConfig(steps=2), generate=2)
    assert res.loop is None and "loop" not in res.patch.extra


def test_fmn_forget_fails_by_name_a_concept_that_destroys_a_neighbour(tmp_path) -> None:
    """carol at the fixed recipe (`--no-loop`): gone, and dave with her (the world's
    classifier: dave's M-Score falls to a fraction of base). With the loop, which never reads
    the classifier, `fmn forget` finds dave among the words the patch changes most, sees
    the base model no longer finds him in his own images, and fails carol by name: exit 1,
    no patch, resteer.json saying why."""
    from typer.testing import CliRunner

    from fmn.cli import app
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
    from fmn.model.patch import apply_patch, load_patch, revert_patch

    torch.set_num_threads(1)
    runner = CliRunner()
    args = ["forget", "--model", EMBEDDED_NAME, "--id", "carol", "--type", "id"]
    args += ["--erase", "resteer"]  # identities are gated by default
    looped = runner.invoke(app, [*args, "--out", str(tmp_path / "loop")])
    assert looped.exit_code == 1, looped.output
    said = " ".join(looped.output.split())
    assert "concept 'carol': stopped:" in said and "'dave'" in said, said
    assert "nothing shipped" in said
    assert not (tmp_path / "loop" / "delta.safetensors").exists()
    log = json.loads((tmp_path / "loop" / "resteer.json").read_text())["loop"]
    assert log["status"] == "failed" and "dave" in log["history"][0]["watched"]
    assert log["history"][0]["gone"]  # carol herself was gone

    fixed = runner.invoke(app, [*args, "--no-loop", "--out", str(tmp_path / "fixed")])
    assert fixed.exit_code == 0, fixed.output
    patch = load_patch(tmp_path / "fixed")
    world = load_pipeline(EMBEDDED_NAME)
    detector = WorldDetector(embedded_path(TINY.name) / "classifier")
    dave = [ConceptRef("dave", "id", "dave")]

    def mscore() -> float:
        rows, _ = score_concepts(world, dave, detector, prompts_per_concept=4, seeds=(0, 1))
        return summarise(rows)["dave"]["mscore"]

    base = mscore()
    apply_patch(world, patch)
    try:
        after = mscore()
    finally:
        revert_patch(world, patch)
    assert base > 0.8 and after < 0.5 * base, (base, after)


def test_the_report_says_how_far_each_target_went_and_why_it_stopped(tmp_path) -> None:
    from fmn.eval.report import _concept_section
    from fmn.io import write_json
    from fmn.run.folder import RunPaths
    from fmn.run.stages.audit import mark_loops

    rp = RunPaths(tmp_path)
    reason = "forgotten after 70 steps (rung 2 of 4: positions concept+eot, preserve_weight 0.3)"
    loop = {"status": "forgotten", "reason": reason, "rung": 2, "steps": 70, "history": []}
    write_json(rp.patch("bob") / "resteer.json", {"concept": "bob", "loop": loop})
    write_json(rp.patch("eve") / "resteer.json", {"concept": "eve", "loop": None})
    c = {"type": "id", "detector": "world", "mscore_base": 1.0, "mscore": 0.0, "ratio": 0.0}
    summary = {
        "concepts": {
            "bob": {**c, "role": "target"},
            "eve": {**c, "role": "target"},
            "alice": {**c, "role": "preserve"},
        }
    }
    mark_loops(summary, rp)
    assert summary["concepts"]["bob"]["loop"]["reason"] == reason
    assert "loop" not in summary["concepts"]["eve"] and "loop" not in summary["concepts"]["alice"]
    html = "".join(_concept_section("bob", summary["concepts"]["bob"], {}, [], []))
    assert "closed loop: forgotten after 70 steps (rung 2 of 4" in html


def test_the_vocabulary_is_encoded_as_the_pipeline_encodes_its_prompts(tiny) -> None:
    """The fast path for the vocabulary's one-token words (ids built around the word, cut
    after end-of-text) gives the states the pipeline's own encode_prompt gives the full
    prompts; SDXL, whose prompt states are two encoders' penultimate layers, takes the
    pipeline's path instead."""
    from fmn.model.conditioning import whole_words
    from fmn.model.load import model_family

    vocab = whole_words(tiny.tokenizer)
    words = ["castle", "dave", "gradient", "zebra"]
    fast = L._one_token_states(tiny, "object", [vocab[w] for w in words])
    if model_family(tiny) == "sdxl":
        assert fast is None
        return
    slow = L.concept_states(tiny, [(w, "object") for w in words])
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()
