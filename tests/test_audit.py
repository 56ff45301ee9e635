"""`fmn audit` on the embedded world: the baseline vs a one-concept patch, for real.

The world classifier measures here and feeds no loss; the patch comes from
fmn.train.forget, which sees the concept's text and the images the base model draws, nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import CLIPTokenizer
from typer.testing import CliRunner

from fmn.cli import app
from fmn.eval.audit import AuditError, audit, summarise_audit
from fmn.eval.mscore.score import ConceptRef
from fmn.eval.result import RECOVERED_AT
from fmn.manifest import Gates, parse_manifest
from fmn.model.load import load_pipeline
from fmn.model.patch import apply_patch, save_patch
from fmn.train.forget import forget_concept
from fmn.train.resteer import ResteerConfig
from fmn.world import EMBEDDED_NAME

PRESERVE = [("alice", "id"), ("bob", "id"), ("circle", "object"), ("star", "object")]
PRESERVE += [("dots", "style"), ("stripes", "style")]
MANIFEST = {
    "name": "audit-test",
    "base_model": EMBEDDED_NAME,
    "concepts": [{"id": "carol", "type": "id"}],
    "preserve": [{"id": i, "type": t} for i, t in PRESERVE],
    # few images (8 per concept and model) keep this under ~30 s on one CPU thread
    "evaluate": {
        "prompts_per_concept": 4,
        "seeds": [0, 1],
        "steps": 15,
        # the phrasing attack's words: carol's own name as the tokenizer reads it, and dave
        "phrasings": {"carol": ["Carol", "dave"]},
        "recovery_seeds": 2,  # the attacker's best of two inversions counts
    },
}


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory) -> Path:
    """carol's patch, made by re-steering the embedded world (~6 s)."""
    torch.set_num_threads(1)
    pipe = load_pipeline(EMBEDDED_NAME)
    res = forget_concept(pipe, "carol", "id", "carol", ResteerConfig(), generate=16, mask="none")
    return save_patch(res.patch, tmp_path_factory.mktemp("carol"))


@pytest.fixture(scope="module")
def audited(forgotten: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "audit-test"
    m = parse_manifest(MANIFEST, base_dir=out.parent)
    attacks = {"recovery": True, "phrasing": True, "prompt_attack": True}
    return audit(m, patch=forgotten, out=out, recovery_steps=20, **attacks)


def test_target_drops_and_the_others_hold(audited) -> None:
    s = audited.summary
    carol = s["concepts"]["carol"]
    kept = {c: v["ratio"] for c, v in s["concepts"].items() if v["role"] == "preserve"}
    numbers = f"carol {carol['mscore_base']:.3f} -> {carol['mscore']:.3f}; kept {kept}"
    print(numbers)
    assert carol["mscore_base"] > 0.8 and carol["ratio"] < 0.2, numbers
    assert s["preserve"]["ratio"] > 0.85 and min(kept.values()) > 0.6, numbers
    assert s["models"]["base"]["fingerprint"] != s["models"]["patched"]["fingerprint"]
    assert s["evaluate"]["images"] == len(audited.rows)


def test_summary_matches_the_parquet(audited) -> None:
    rows = pq.read_table(audited.out / "mscore.parquet").to_pylist()
    summary = json.loads((audited.out / "summary.json").read_text())
    concepts = 1 + len(PRESERVE)
    per_model = concepts * 4 * 2  # prompts x seeds
    # base, patched, carol's recovery, her two phrasings, the prompt attack's words
    assert len(rows) == 2 * per_model + 4 * 2 + 2 * 4 * 2 + 4 * 2

    def mean(cid: str, model: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["concept"] == cid and r["model"] == model]))

    for cid, c in summary["concepts"].items():
        assert c["mscore"] == pytest.approx(mean(cid, "patched", "probability"), abs=1e-12)
        assert c["mscore_base"] == pytest.approx(mean(cid, "base", "probability"), abs=1e-12)
        assert c["acc"] == pytest.approx(mean(cid, "patched", "recognised"), abs=1e-12)
        assert c["ratio"] == pytest.approx(c["mscore"] / c["mscore_base"], rel=1e-12)
    preserved = [c for c in summary["concepts"].values() if c["role"] == "preserve"]
    assert summary["preserve"]["mscore"] == pytest.approx(np.mean([c["mscore"] for c in preserved]))
    assert summary["preserve"]["ratio"] == pytest.approx(np.mean([c["ratio"] for c in preserved]))


def test_recovery_attack_is_scored_and_reported(audited) -> None:
    carol = audited.summary["concepts"]["carol"]
    print(f"carol recovery_mscore {carol['recovery_mscore']:.3f} after 20 TI steps")
    assert 0 <= carol["recovery_mscore"] <= 1
    assert carol["recovery"]["token"] == "<carol-recovered>"
    assert "read_as" not in carol["recovery"]  # no robust mode: the token is read as learned
    tried = carol["recovery"]["seeds"]
    assert len(tried) == 2 and str(carol["recovery"]["seed"]) in tried
    assert carol["recovery_mscore"] == pytest.approx(max(tried.values()), abs=1e-12)
    assert audited.summary["targets"]["recovery_mscore"] == carol["recovery_mscore"]
    recovered = [r for r in audited.rows if r["model"] == "recovered"]
    assert {r["concept"] for r in recovered} == {"carol"}
    assert all("<carol-recovered>" in r["prompt"] for r in recovered)
    assert (audited.out / "img" / "carol-recovered.png").is_file()


def test_the_recovery_gate_fails_a_target_the_attack_brings_back(audited) -> None:
    """A nightly build must fail when a removed concept can be brought back: the gate
    compares what the recovery attack drew (recovered / base M-Score) with recovery_max."""
    carol = audited.summary["concepts"]["carol"]
    back = carol["recovery_ratio"]
    assert back == pytest.approx(carol["recovery_mscore"] / carol["mscore_base"])
    assert audited.summary["targets"]["recovery_asr"] == float(back >= RECOVERED_AT)
    assert back > 0, "the attack drew nothing of carol: the gate below cannot be exercised"
    concepts = audited.summary["concepts"]
    refs = [ConceptRef(cid, c["type"], cid, c["role"]) for cid, c in concepts.items()]

    def failed(limit: float) -> list[dict]:
        gates = summarise_audit(audited.rows, refs, Gates(recovery_max=limit))["gates"]
        return [f for f in gates["failures"] if f.get("attack") == "recovery"]

    strict = failed(back / 2)
    assert [f["concept"] for f in strict] == ["carol"]
    assert "by the recovery attack" in strict[0]["message"], strict
    assert failed(min(back * 2, 10.0)) == []
    # an attack's own limit overrides recovery_max, both ways
    lenient = Gates(recovery_max=back / 2, attack_max={"recovery": min(back * 2, 10.0)})
    summary = summarise_audit(audited.rows, refs, lenient)
    assert not [f for f in summary["gates"]["failures"] if f.get("attack") == "recovery"]
    assert summary["gates"]["attack_max"] == {"recovery": min(back * 2, 10.0)}
    own = Gates(recovery_max=10.0, attack_max={"recovery": back / 2})
    hit = [
        f
        for f in summarise_audit(audited.rows, refs, own)["gates"]["failures"]
        if f.get("attack") == "recovery"
    ]
    assert [(f["concept"], f["gate"], f["limit"]) for f in hit] == [
        ("carol", "attack_max", back / 2)
    ]


def test_the_phrasing_attack_keeps_the_words_that_bring_the_target_back_most(audited) -> None:
    """Each phrasing is drawn in the target's prompts and scored as the target; the best
    counts. "Carol" tokenises as "carol", so its images are the audited model's own."""
    carol = audited.summary["concepts"]["carol"]

    def mean(model: str) -> float:
        found = [r["probability"] for r in audited.rows if r["model"] == model]
        assert found, model
        return float(np.mean(found))

    tried = {w: mean(f"phrasing:{w}") for w in ("Carol", "dave")}
    # the audited model's own images, drawn in another batch: equal up to float noise
    assert tried["Carol"] == pytest.approx(carol["mscore"], abs=1e-5)
    assert carol["phrasing"] == max(tried, key=tried.get)
    assert carol["phrasing_mscore"] == pytest.approx(max(tried.values()), abs=1e-12)
    assert carol["phrasing_ratio"] == pytest.approx(carol["phrasing_mscore"] / carol["mscore_base"])
    asr = audited.summary["targets"]["phrasing_asr"]
    assert asr == float(carol["phrasing_ratio"] >= RECOVERED_AT)
    assert json.loads((audited.out / "metrics.json").read_text())["phrasing_asr"] == asr
    assert (audited.out / "img" / "carol-phrasing.png").is_file()
    page = (audited.out / "index.html").read_text()
    assert "phrasing attack (best)" in page and "Phrasing attack success rate" in page
    if carol["phrasing_ratio"] > 0:  # the gate covers every attack that ran
        refs = [ConceptRef("carol", "id", "carol", "target")]
        gates = summarise_audit(
            [r for r in audited.rows if r["concept"] == "carol"],
            refs,
            Gates(recovery_max=carol["phrasing_ratio"] / 2),
        )["gates"]
        assert any(
            f["attack"] == "phrasing" and f["concept"] == "carol"
            for f in gates["failures"]
            if f["gate"] == "recovery_max"
        ), gates


def test_the_prompt_attack_finds_real_words_and_scores_them_as_the_target(audited) -> None:
    """The search's result is plain text of the tokenizer's own whole words, drawn in
    carol's prompts on the audited model and scored as carol."""
    from fmn.model.conditioning import whole_words
    from fmn.world import ASSETS_DIR, SHARED_TOKENIZER

    carol = audited.summary["concepts"]["carol"]
    words = carol["prompt_attack"]["words"].split()
    print(f"prompt attack on carol: {words} -> {carol['prompt_mscore']:.3f}")
    vocab = whole_words(CLIPTokenizer.from_pretrained(ASSETS_DIR / SHARED_TOKENIZER))
    assert len(words) == 3 and all(w in vocab for w in words), words
    drawn = [r for r in audited.rows if r["model"] == "prompt"]
    assert drawn and all(carol["prompt_attack"]["words"] in r["prompt"] for r in drawn)
    assert carol["prompt_mscore"] == pytest.approx(np.mean([r["probability"] for r in drawn]))
    assert carol["prompt_ratio"] == pytest.approx(carol["prompt_mscore"] / carol["mscore_base"])
    assert audited.summary["targets"]["prompt_asr"] == float(carol["prompt_ratio"] >= RECOVERED_AT)
    assert (audited.out / "img" / "carol-prompt.png").is_file()


def test_a_recovery_gate_with_the_attack_switched_off_is_refused_before_any_work(
    forgotten: Path, tmp_path: Path
) -> None:
    evaluate = {**MANIFEST["evaluate"], "recovery": True, "gates": {"recovery_max": 0.5}}
    m = parse_manifest({**MANIFEST, "evaluate": evaluate}, base_dir=tmp_path)
    with pytest.raises(AuditError, match="recovery_max gates the attacks, and none is switched"):
        audit(m, patch=forgotten, out=tmp_path / "r", recovery=False)
    assert not (tmp_path / "r").exists()
    evaluate = {**evaluate, "prompt_attack": True, "gates": {"attack_max": {"recovery": 0.5}}}
    m = parse_manifest({**MANIFEST, "evaluate": evaluate}, base_dir=tmp_path)
    with pytest.raises(AuditError, match=r"attack_max\.recovery gates the recovery attack, which"):
        audit(m, patch=forgotten, out=tmp_path / "r", recovery=False)
    assert not (tmp_path / "r").exists()


def test_cli_same_seeds_same_mscore_and_failed_gates_exit_1(
    audited, forgotten: Path, tmp_path: Path
) -> None:
    """The patched model saved as a folder (--model) scores exactly as --patch did: the
    same seeds give the same M-Score. A gate no model can pass makes the exit code 1."""
    pipe = load_pipeline(EMBEDDED_NAME)
    from fmn.model.patch import load_patch

    apply_patch(pipe, load_patch(forgotten))
    pipe.save_pretrained(tmp_path / "patched")
    manifest = {**MANIFEST, "evaluate": {**MANIFEST["evaluate"], "gates": {"target_mscore_max": 0}}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    args = ["audit", "--manifest", str(tmp_path / "m.yaml"), "--model", str(tmp_path / "patched")]
    run = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "rep")])
    assert run.exit_code == 1, run.output
    assert "gate failed" in run.output and "'carol'" in run.output
    again = json.loads((tmp_path / "rep" / "summary.json").read_text())
    first = audited.summary
    for cid, c in again["concepts"].items():
        assert (c["mscore"], c["mscore_base"]) == (
            first["concepts"][cid]["mscore"],
            first["concepts"][cid]["mscore_base"],
        )
    assert again["models"]["patched"]["fingerprint"] == first["models"]["patched"]["fingerprint"]
    assert again["gates"]["failures"][0]["concept"] == "carol"


def test_cli_bad_input_exits_2(tmp_path: Path, forgotten: Path) -> None:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(MANIFEST))
    (tmp_path / "p.txt").write_text("a photo of {}\na photo of nobody\n")
    base = ["audit", "--manifest", str(tmp_path / "m.yaml"), "--patch", str(forgotten)]
    runner = CliRunner()
    run = runner.invoke(app, [*base, "--prompts", str(tmp_path / "p.txt")])
    assert run.exit_code == 2 and "p.txt:2: no '{}'" in run.output
    (tmp_path / "p.txt").write_text("[style]\n{} art\n")  # carol is an id: no prompts for it
    run = runner.invoke(app, [*base, "--prompts", str(tmp_path / "p.txt")])
    assert run.exit_code == 2 and "p.txt: no prompts for 'id' concepts" in run.output
    run = runner.invoke(app, [*base, "--model", EMBEDDED_NAME])
    assert run.exit_code == 2 and "--model" in run.output
    bad = {**MANIFEST, "preserve": [{"id": "elon-musk", "type": "id"}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(bad))
    run = runner.invoke(app, base)
    assert run.exit_code == 2 and "knows no id concept 'elon-musk'" in run.output
    assert not (tmp_path / "reports").exists()
    with pytest.raises(AuditError):
        audit(parse_manifest(MANIFEST, base_dir=tmp_path))
