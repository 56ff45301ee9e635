"""Gated text-state erasure (fmn.model.eraser): a gated concept's prompts are re-mapped,
every other prompt passes bit-exact; the eraser travels in one safetensors file, a model
folder that carries it loads with it (and a fingerprint that says so); a manifest gates
identities by default and the flow writes, audits and reports the gates.

The world classifier measures here and feeds nothing: the eraser sees the concept's text,
its type's templates and the tokenizer's vocabulary."""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import replace

import pytest
import torch

from fmn.manifest import ManifestError, load_manifest
from fmn.merge.gates import fit
from fmn.model import eraser
from fmn.model.conditioning import encode_text
from fmn.model.load import fingerprint, load_pipeline
from tests.flow_helpers import TINY, run_flow
from tests.tiny import build_tiny_pipeline

TARGET = ["a photo of alice", "a portrait of alice", "alice in a red dress"]
OTHERS = ["a photo of bob", "bob in a red dress", "a picture in the style of monet", ""]


@pytest.fixture(scope="module")
def sd1(clip_tokenizer_dir):
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gate(sd1):
    return fit(sd1, [("alice", "id", ["alice"])])


def _states(pipe, prompts: list[str]) -> torch.Tensor:
    return encode_text(pipe, prompts).embeds


def test_the_gate_moves_the_target_to_its_anchor_and_nothing_else(sd1, gate) -> None:
    before = _states(sd1, TARGET + OTHERS)
    anchor = _states(
        sd1, ["a photo of a person", "a portrait of a person", "a person in a red dress"]
    )
    with eraser.applied(sd1, gate):
        after = _states(sd1, TARGET + OTHERS)
    assert torch.equal(after[len(TARGET) :], before[len(TARGET) :])  # bit-exact
    # the name, wherever it stands, is read as the anchor's words ("a person"), and by
    # default half a step past them, away from the name
    for k in range(len(TARGET)):
        assert (before[k] - anchor[k]).norm() > 1
        assert (after[k] - before[k]).norm() > 1.2 * (anchor[k] - before[k]).norm()
    assert torch.equal(_states(sd1, TARGET), before[: len(TARGET)])  # removed after the block
    with eraser.applied(sd1, fit(sd1, [("alice", "id", ["alice"])], overshoot=0.0)):
        exact = _states(sd1, TARGET)
    torch.testing.assert_close(exact, anchor)
    (g,) = gate.gates
    assert 0 < g.radius < g.nearest


def test_a_gated_style_is_dropped_with_its_lead_in_unless_given_an_anchor(sd1) -> None:
    said = ["a photo of bob in the style of monet", "monet style", "a photo of bob"]
    plain = _states(sd1, ["a photo of bob", "style", "a photo of bob"])
    with eraser.applied(sd1, fit(sd1, [("monet", "style", ["monet"])], dropped_overshoot=0.0)):
        dropped = _states(sd1, said)
    # "a photo of bob" is what the user asked for, less the style: bob keeps his words
    torch.testing.assert_close(dropped, plain)
    gate = fit(sd1, [("monet", "style", ["monet"])], overshoot=0.0, anchors={"monet": "art"})
    with eraser.applied(sd1, gate):
        named = _states(sd1, said[:1])
    torch.testing.assert_close(named, _states(sd1, ["a photo of bob in the style of art"]))


def test_a_token_learned_after_install_is_checked_as_a_word(sd1, clip_tokenizer_dir) -> None:
    # the inversion attack adds a token to the installed pipeline's tokenizer
    gate = fit(sd1, [("alice", "id", ["alice"])], overshoot=0.0)  # vocabulary cached
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)  # the same weights, to change
    with eraser.applied(pipe, gate):
        pipe.tokenizer.add_tokens(["<learned>"])
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        emb = pipe.text_encoder.get_input_embeddings().weight
        row = pipe.tokenizer.convert_tokens_to_ids
        with torch.no_grad():  # while training, the learned row is bob's: nothing fires
            emb[-1] = emb[row("bob</w>")]
        bob = _states(pipe, ["a photo of <learned>", "a photo of bob"])
        with torch.no_grad():  # then it becomes alice's own, which must fire her gate
            emb[-1] = emb[row("alice</w>")]
        got = _states(pipe, ["a photo of <learned>", "a photo of alice", "a photo of bob"])
        anchor = _states(pipe, ["a photo of a person"])[0]
    torch.testing.assert_close(bob[0], bob[1])
    torch.testing.assert_close(got[0], anchor)  # checked again, not remembered as bob's
    torch.testing.assert_close(got[1], anchor)
    assert (got[2] - anchor).norm() > 1


def test_a_word_after_an_end_of_text_token_is_still_checked(sd1) -> None:
    # the tokenizer turns a typed "<|endoftext|>" into the special token; the text encoder
    # and the U-Net read on past it, so the check must too (robust mode's inversion attack
    # found this: its tokens read as "<|endoftext|> style <|endoftext|> robert")
    hidden = ["a photo of <|endoftext|> alice", "<|endoftext|> alice <|endoftext|> smiling"]
    anchored = ["a photo of <|endoftext|> a person", "<|endoftext|> a person <|endoftext|> smiling"]
    with eraser.applied(sd1, fit(sd1, [("alice", "id", ["alice"])], overshoot=0.0)):
        got = _states(sd1, hidden)
        kept = _states(sd1, ["a photo of <|endoftext|> bob"])
    torch.testing.assert_close(got, _states(sd1, anchored))
    assert torch.equal(kept, _states(sd1, ["a photo of <|endoftext|> bob"]))


def test_robust_mode_reads_a_learned_token_as_its_nearest_word(
    sd1, clip_tokenizer_dir, tmp_path
) -> None:
    """A textual inversion can put any vector in a token; locked, the eraser reads it as
    the base word nearest to it (so alice's gate sees alice), passes the gradient straight
    through, and leaves prompts of real words as the unlocked eraser does."""
    plain = fit(sd1, [("alice", "id", ["alice"])], overshoot=0.0)  # vocabulary cached
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)  # the same weights, to change
    assert fingerprint(pipe) == fingerprint(sd1)
    locked = eraser.load(eraser.save(replace(plain, lock=True), tmp_path / "l.safetensors"))
    assert locked.lock and not plain.lock
    row = pipe.tokenizer.convert_tokens_to_ids
    emb = pipe.text_encoder.get_input_embeddings().weight
    alice = emb[row("alice</w>")].detach().clone()
    with eraser.applied(pipe, plain):
        kept = _states(pipe, OTHERS)
    with eraser.applied(pipe, locked):
        assert torch.equal(_states(pipe, OTHERS), kept)  # real words: as before
        pipe.tokenizer.add_tokens(["<learned>"])
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        emb = pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():  # nearer alice than any other word, yet far from her
            emb[-1] = alice + 0.3 * torch.randn_like(alice) * alice.std()
        got = _states(pipe, ["a photo of <learned>", "a photo of alice"])
        with torch.no_grad():  # near bob: read as bob, and its gradient is bob's
            emb[-1] = emb[row("bob</w>")] + 0.01
        assert eraser.read_as(pipe, emb[-1:].detach()) == "bob</w>"  # what audits report
        emb.requires_grad_(True)
        ids = pipe.tokenizer(["a photo of <learned>"], return_tensors="pt").input_ids
        learned = pipe.text_encoder(ids)[0]
        (learned * torch.randn_like(learned)).sum().backward()  # a sum is flat: layer norm
        assert emb.grad[-1].abs().sum() > 0  # straight through: an attack still searches
        emb.requires_grad_(False)
        with torch.no_grad():  # a row changed in place reads as the word nearest to it
            emb[row("bob</w>")] = alice + 0.01
        bob = _states(pipe, ["a photo of bob"])
    assert eraser.read_as(pipe, alice[None]) is None  # no lock installed: nothing read
    torch.testing.assert_close(got[0], got[1])  # alice's gate fired on the learned token
    torch.testing.assert_close(learned.detach()[0], kept[0, :6])  # "a photo of bob"
    torch.testing.assert_close(bob[0], got[1])
    anchor = _states(pipe, ["a photo of a person"])[0]
    torch.testing.assert_close(got[1], anchor)


def test_eraser_file_and_model_folder_carry_the_gate(sd1, gate, tmp_path) -> None:
    path = eraser.save(gate, tmp_path / "g.safetensors")
    back = eraser.load(path)
    assert back.concepts == ["alice"] and back.soft == gate.soft
    for k, t in gate.tensors().items():
        assert torch.equal(back.tensors()[k], t), k
    plain, gated = tmp_path / "plain", tmp_path / "gated"
    sd1.save_pretrained(plain, safe_serialization=True)
    shutil.copytree(plain, gated)
    eraser.save(gate, gated / eraser.ERASER_FILE)
    loaded, base = load_pipeline(gated), load_pipeline(plain)
    assert eraser.installed(loaded) and not eraser.installed(base)
    assert fingerprint(loaded) != fingerprint(base)
    assert torch.equal(_states(loaded, OTHERS), _states(base, OTHERS))
    assert not torch.equal(_states(loaded, TARGET), _states(base, TARGET))


def test_a_merge_of_gated_concepts_only_writes_the_eraser_and_a_model_that_carries_it(
    sd1, gate, tmp_path
) -> None:
    from fmn.merge.fuse import MergeResult, write_merged
    from fmn.model.patch import Patch

    nothing = Patch("", "merge:none", {}, base_fingerprint=fingerprint(sd1), extra={"concepts": []})
    record = write_merged(sd1, MergeResult(patch=nothing, seconds=0.0), tmp_path / "m", eraser=gate)
    assert not (tmp_path / "m" / "delta.safetensors").exists()
    assert "skipped" in record["lora"] and [c["id"] for c in record["concepts"]] == ["alice"]
    loaded = load_pipeline(tmp_path / "m" / "model")
    assert eraser.installed(loaded) and not eraser.installed(sd1)


def test_fmn_forget_writes_a_gate_that_apply_and_audit_take_and_says_how_far_it_went(
    sd1, tmp_path
) -> None:
    from typer.testing import CliRunner

    from fmn.cli import app
    from fmn.model.patch import apply_patch, load_patch, revert_patch

    base = tmp_path / "base"
    sd1.save_pretrained(base, safe_serialization=True)
    run = CliRunner().invoke
    forget = ["forget", "--model", str(base), "--id", "alice", "--type", "id"]
    said = run(app, [*forget, "--preserve", "bob:id", "--out", str(tmp_path / "o")])
    assert said.exit_code == 0, said.output
    log = json.loads((tmp_path / "o" / "gate.json").read_text())
    assert log["erase"] == "gate" and 0 < log["radius"] < log["nearest"] and log["near"]
    assert log["near"] in log["reason"] and "gated: fires within" in " ".join(said.output.split())
    assert not (tmp_path / "o" / "delta.safetensors").exists()

    # `fmn audit --patch` and `fmn apply` read the folder as a patch that installs the gate
    patch, pipe = load_patch(tmp_path / "o"), load_pipeline(base)
    before = _states(pipe, TARGET + OTHERS)
    apply_patch(pipe, patch)
    after = _states(pipe, TARGET + OTHERS)
    gated_print = fingerprint(pipe)
    revert_patch(pipe, patch)
    assert not eraser.installed(pipe) and torch.equal(_states(pipe, TARGET), before[:3])
    assert torch.equal(after[3:], before[3:]) and not torch.equal(after[:3], before[:3])
    applied = run(app, ["apply", "--model", str(base), "--patch", str(tmp_path / "o"),
                        "--out", str(tmp_path / "m")])  # fmt: skip
    assert applied.exit_code == 0, applied.output
    assert fingerprint(load_pipeline(tmp_path / "m")) == gated_print

    # a re-steering option, a merge, an export: refused by name, nothing written
    wrong = run(app, [*forget, "--steps", "3", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "--steps: alice is gated" in " ".join(wrong.output.split())
    wrong = run(app, [*forget, "--erase", "gate", "--invert", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "--invert: alice is gated" in " ".join(wrong.output.split())
    assert not (tmp_path / "x").exists()
    merged = run(
        app, ["merge", str(tmp_path / "o"), "--model", str(base), "--out", str(tmp_path / "y")]
    )
    assert merged.exit_code == 2 and "a gate (eraser.safetensors)" in merged.output
    lora = run(app, ["export", "--patch", str(tmp_path / "o"), "--out", str(tmp_path / "l.st")])
    assert lora.exit_code == 2 and "no LoRA holds" in " ".join(lora.output.split())
    assert not (tmp_path / "l.st").exists()


def test_a_broken_eraser_file_is_refused_by_name(sd1, tmp_path) -> None:
    folder = tmp_path / "model"
    sd1.save_pretrained(folder, safe_serialization=True)
    (folder / eraser.ERASER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(eraser.EraserError, match=r"eraser\.safetensors"):
        load_pipeline(folder)


def test_sdxl_is_refused_before_any_work(clip_tokenizer_dir) -> None:
    pipe = build_tiny_pipeline("sdxl", clip_tokenizer_dir)
    with pytest.raises(eraser.EraserError, match="SDXL"):
        fit(pipe, [("alice", "id", ["alice"])])


def test_a_route_draws_the_guides_in_turn_and_keeps_them_in_its_file(sd1, tmp_path) -> None:
    """A correction's gate (`action: correct` with guide prompts): every prompt that names
    the word gets the next guide's words, the others pass bit-exact."""
    guides = {"carol": ["alice", "bob"], "dave": ["mary", "tom"]}
    route = fit(sd1, [("carol", "id", ["carol"]), ("dave", "id", ["dave"])], guides=guides)
    asked = ["a photo of carol", "a photo of dave", "a photo of carol", "carol in a red dress"]
    before = _states(sd1, asked + OTHERS)
    with eraser.applied(sd1, route):
        after = _states(sd1, asked + OTHERS)
        again = _states(sd1, asked[1:2])  # each route keeps its own turn, across calls
    meant = ["a photo of alice", "a photo of mary", "a photo of bob", "alice in a red dress"]
    torch.testing.assert_close(after[:4], _states(sd1, meant))
    torch.testing.assert_close(again, _states(sd1, ["a photo of tom"]))
    assert torch.equal(after[4:], before[4:])
    g, _ = eraser.load(eraser.save(route, tmp_path / "r.safetensors")).gates
    assert g.guides == ["alice", "bob"] and g.reason().startswith("routed")
    assert "replaced in turn by 'alice', 'bob'" in g.reason()


# ---- the manifest: who is gated --------------------------------------------------------


def _manifest(tmp_path, **extra):
    import yaml

    doc = {
        "name": "m",
        "concepts": [
            {"id": "carol", "type": "id"},
            {"id": "triangle", "type": "object"},
        ],
        **extra,
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_concepts_are_gated_by_default_unless_they_cannot_be(tmp_path) -> None:
    m = load_manifest(_manifest(tmp_path))
    assert {r.id: r.erase for r in m.resolved_concepts()} == {"carol": "gate", "triangle": "gate"}
    inverted = load_manifest(_manifest(tmp_path, defaults={"invert": {"enabled": True}}))
    assert inverted.resolve("carol").erase == "resteer"  # learns tokens: re-steered
    joint = load_manifest(_manifest(tmp_path, merge={"method": "joint"}))
    assert joint.resolve("triangle").erase == "resteer"
    nsfw = _manifest(tmp_path, concepts=[{"id": "nudity", "type": "nsfw"}])
    assert load_manifest(nsfw).resolve("nudity").erase == "resteer"  # reached by unlisted words
    chosen = load_manifest(_manifest(tmp_path, defaults={"erase": "resteer"}))
    assert chosen.resolve("triangle").erase == "resteer"


def test_robust_mode_needs_a_gated_concept(tmp_path) -> None:
    with pytest.raises(ManifestError, match=r"merge\.robust.*no concept is gated"):
        load_manifest(_manifest(tmp_path, defaults={"erase": "resteer"}, merge={"robust": True}))
    assert load_manifest(_manifest(tmp_path, merge={"robust": True})).merge.robust


def test_a_gate_that_cannot_apply_is_refused_by_field(tmp_path) -> None:
    with pytest.raises(ManifestError, match=r"defaults\.erase.*merge\.method"):
        load_manifest(_manifest(tmp_path, defaults={"erase": "gate"}, merge={"method": "joint"}))
    with pytest.raises(ManifestError, match=r"defaults\.erase.*learns no tokens"):
        load_manifest(_manifest(tmp_path, defaults={"erase": "gate", "invert": {"enabled": True}}))


# ---- on the world: the flow ------------------------------------------------------------


def test_the_flow_gates_an_identity_and_re_steers_an_object(prefect_api, tmp_path) -> None:
    import yaml

    doc = {
        "name": "gated",
        "base_model": "embedded:tiny-world",
        **TINY,
        "defaults": {"resteer": TINY["defaults"]["resteer"]},  # erase: auto
        "concepts": [
            {"id": "carol", "type": "id"},
            {"id": "triangle", "type": "object", "images": {"generate": 2}, "erase": "resteer"},
        ],
        "merge": {"robust": True},
    }
    manifest = tmp_path / "gated.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "run"
    result, states = run_flow(manifest, out)
    assert result["concepts"] == {"carol": "gated", "triangle": "trained"}
    assert not any(n.endswith("-carol") for n in states)  # no images, no patch of its own
    merged = out / "merged"
    merge = json.loads((merged / "merge.json").read_text())
    assert [c["id"] for c in merge["concepts"]] == ["triangle", "carol"]
    assert [g["id"] for g in merge["gated"]] == ["carol"]
    assert (merged / eraser.ERASER_FILE).is_file() and merge["robust"]
    record = json.loads((out / "merged.json").read_text())
    model = load_pipeline(merged / "model")
    assert fingerprint(model) == record["model_fingerprint"]
    assert eraser.installed_eraser(model).lock  # robust mode travels with the model
    summary = json.loads((out / "report" / "summary.json").read_text())
    gate = summary["concepts"]["carol"]["gate"]
    assert gate["radius"] > 0 and "nearest other prompt" in gate["reason"]
    # the audit shows how far the gate reaches and which prompt stopped it
    robust = "robust mode: only the base vocabulary's words"
    shown = f"text-state gate ({robust}): {html.escape(gate['reason'])}"
    assert shown in (out / "report" / "index.html").read_text()
    again, _ = run_flow(manifest, out)
    assert again["concepts"] == {"carol": "cached", "triangle": "cached"}
    assert again["stages"] == {"merge": "cached", "audit": "cached"}


def test_on_the_world_gated_concepts_are_forgotten_wherever_named_and_the_rest_kept() -> None:
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
    from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
    from fmn.world.concepts import get_concept

    torch.set_num_threads(1)
    pipe, detector = load_pipeline(EMBEDDED_NAME), WorldDetector(EMBEDDED_DIR / "classifier")
    refs = [
        ConceptRef(c.id, c.type, c.text)
        for c in map(get_concept, ["carol", "triangle", "alice", "eve", "outline"])
    ]
    prompts = {  # the object inside longer prompts, and a style drawn on the object
        "triangle": [
            "a photo of a red triangle",
            "an image of a blue triangle in the style of dots",
        ],
        "outline": [
            "a photo of a triangle in the style of outline",
            "an image in the style of outline",
        ],
    }

    def scores() -> dict[str, float]:
        rows, _ = score_concepts(
            pipe, refs, detector, prompts_per_concept=2, seeds=(0, 1), steps=15,
            prompts=prompts,
        )  # fmt: skip
        return {c: s["mscore"] for c, s in summarise(rows).items()}

    base = scores()
    gates = fit(pipe, [("carol", "id", ["carol"]), ("triangle", "object", ["triangle"])])
    with eraser.applied(pipe, gates):
        after = scores()
    for c in ("carol", "triangle"):
        assert base[c] > 0.5 and after[c] < 0.2 * base[c], (c, base, after)
    assert {c: after[c] for c in ("alice", "eve")} == {c: base[c] for c in ("alice", "eve")}
    # their prompts never reach a gate: the same images; outline's name the triangle
    assert after["outline"] >= 0.8 * base["outline"], (base, after)


def test_a_word_that_reads_as_the_concept_blocks_its_gate_unless_widened(
    clip_tokenizer_dir,
) -> None:
    # "zebra" is made alice's twin (the same token row): the base model draws it as alice
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    row = pipe.tokenizer.convert_tokens_to_ids
    emb = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[row("zebra</w>")] = emb[row("alice</w>")]
    with pytest.raises(eraser.EraserError, match=r"'alice' cannot be gated: .*'zebra'.*its words"):
        fit(pipe, [("alice", "id", ["alice"])])  # no radius keeps the twin out: by name
    widened = fit(pipe, [("alice", "id", ["alice"])], widen=["alice"])
    (gate,) = widened.gates
    # (a random tiny model draws nothing in particular, so other words may come in too)
    assert dict(gate.similar)["zebra"] == pytest.approx(1.0) and "'zebra' (1.00)" in gate.reason()
    said = ["a photo of zebra", "a photo of alice", "a photo of bob"]
    before = _states(pipe, said)
    with eraser.applied(pipe, widened):
        after = _states(pipe, said)
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert torch.equal(after[2], before[2])


def test_on_crowd_world_the_base_model_draws_an_unlisted_phrasing_like_its_concept() -> None:
    from fmn.merge.similar import SIMILAR_SHARE, similar_words
    from fmn.world.concepts import CROWD

    torch.set_num_threads(1)
    pipe = load_pipeline(f"embedded:{CROWD.name}")
    # the world trained "love" as one of heart's phrasings, which no manifest lists; the
    # base model itself says so, and says no such thing of other objects' words
    found = similar_words(pipe, "object", ["heart", "valentine"], ["cross", "love", "star"])
    assert [w for w, _ in found] == ["love"] and found[0][1] > SIMILAR_SHARE
