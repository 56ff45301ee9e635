"""Merging patches: the weighted sum, the closed-form fit, outputs and refusals."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from fmn.cli import app
from fmn.merge.fuse import MergeConfig, MergeError, merge_patches, preserve_rows, write_merged
from fmn.model.conditioning import encode_text
from fmn.model.load import fingerprint, load_pipeline
from fmn.model.patch import Patch, load_patch, patch_hash, save_patch
from tests.tiny import build_tiny_pipeline

KV = re.compile(r"attn2\.to_[kv]\.weight$")
CONCEPTS = [("cat", "object"), ("picasso", "style"), ("mary", "id")]


@pytest.fixture(scope="module")
def pipe(clip_tokenizer_dir):
    torch.set_num_threads(1)
    return build_tiny_pipeline("sd1", clip_tokenizer_dir, seed=0)


def _patch(pipe, text: str, kind: str, seed: int, scale: float = 0.1) -> Patch:
    """A stand-in for a re-steering patch: random to_k/to_v deltas, with the concept
    recorded the way forget_concept records it."""
    g = torch.Generator().manual_seed(seed)
    deltas = {
        n: scale * torch.randn(p.shape, generator=g)
        for n, p in pipe.unet.named_parameters()
        if KV.search(n)
    }
    return Patch(
        concept=text,
        method="resteer",
        deltas=deltas,
        config={"concept": {"id": text, "type": kind, "text": text}, "resteer": {}},
        base_fingerprint=fingerprint(pipe),
    )


def _outputs(pipe, deltas: dict[str, torch.Tensor], prompts: list[str], keys) -> torch.Tensor:
    """Keys/values the patched model computes for the prompts: what the merge acts on."""
    rows = encode_text(pipe, prompts).embeds.reshape(-1, pipe.text_encoder.config.hidden_size)
    params = dict(pipe.unet.named_parameters())
    return torch.cat([(rows @ (params[n] + deltas.get(n, 0)).T).flatten() for n in sorted(keys)])


def test_sum_is_the_weighted_sum(pipe) -> None:
    a, b = _patch(pipe, "cat", "object", 1), _patch(pipe, "picasso", "style", 2)
    res = merge_patches(pipe, [a, b], MergeConfig(method="sum", weights={"picasso": 0.5}))
    for n, d in res.patch.deltas.items():
        torch.testing.assert_close(d, a.deltas[n] + 0.5 * b.deltas[n])
    assert res.patch.concept == "cat,picasso" and res.patch.method == "merge:sum"


def test_closed_form_keeps_each_edit_and_holds_the_preserve_set(pipe) -> None:
    patches = [_patch(pipe, t, k, i) for i, (t, k) in enumerate(CONCEPTS)]
    preserve = [("dog", "object"), ("van gogh", "style")]
    cf = merge_patches(pipe, patches, MergeConfig(method="closed-form"), preserve=preserve)
    summed = merge_patches(pipe, patches, MergeConfig(method="sum"))
    # the preserve set (the manifest's preserved concepts + generic anchors) moves far less
    # under the closed form than under the sum
    rows, w = preserve_rows(pipe, {t for t, _ in CONCEPTS}, preserve, len(CONCEPTS))
    rows, w = rows.float(), w.float()
    params = dict(pipe.unet.named_parameters())

    def drift(deltas):
        num = sum((rows @ d.T).pow(2).mul(w[:, None]).sum() for n, d in deltas.items())
        return (
            (num / sum((rows @ params[n].T).pow(2).mul(w[:, None]).sum() for n in deltas))
            .sqrt()
            .item()
        )

    d_cf, d_sum = drift(cf.patch.deltas), drift(summed.patch.deltas)
    numbers = f"drift closed-form {d_cf:.4f}, sum {d_sum:.4f}"
    assert d_cf < 0.5 * d_sum, numbers
    assert abs(cf.preserve_drift - d_cf) < 1e-3, numbers
    # and each concept keeps a good part of its own edit on its own prompts (random deltas
    # move every direction, so they collide with the preserve set far more than real ones:
    # the world's re-steering patches keep 0.85-0.95)
    assert min(cf.kept.values()) > 0.3, cf.kept


def test_closed_form_of_one_concept_reproduces_it_on_its_prompts(pipe) -> None:
    from fmn.model.conditioning import concept_prompts

    p = _patch(pipe, "cat", "object", 7)
    res = merge_patches(
        pipe, [p], MergeConfig(method="closed-form", preserve_weight=1e-6, ridge=1e-9)
    )
    prompts = concept_prompts("cat", "object")
    keys = list(p.deltas)
    want = _outputs(pipe, p.deltas, prompts, keys)
    got = _outputs(pipe, res.patch.deltas, prompts, keys)
    rel = ((got - want).norm() / (want - _outputs(pipe, {}, prompts, keys)).norm()).item()
    assert rel < 0.05 and res.kept["cat"] > 0.95, f"relative error {rel:.4f}, kept {res.kept}"


def test_streams_patches_from_disk_and_records_hashes(pipe, tmp_path) -> None:
    files = []
    for i, (t, k) in enumerate(CONCEPTS):
        files.append(save_patch(_patch(pipe, t, k, i), tmp_path / t))
    res = merge_patches(pipe, files, preserve=[("dog", "object")])
    hashes = {c["id"]: c["hash"] for c in res.patch.extra["concepts"]}
    assert hashes == {t: patch_hash(f) for (t, _), f in zip(CONCEPTS, files, strict=True)}
    assert set(res.kept) == {t for t, _ in CONCEPTS}


def test_write_merged_outputs_load_and_leave_the_base_alone(pipe, tmp_path) -> None:
    before = fingerprint(pipe)
    res = merge_patches(pipe, [_patch(pipe, t, k, i) for i, (t, k) in enumerate(CONCEPTS)])
    out = tmp_path / "merged"
    record = write_merged(pipe, res, out)
    assert fingerprint(pipe) == before
    assert sorted(p.name for p in out.iterdir()) == [
        "delta.safetensors",
        "lora.safetensors",
        "merge.json",
        "model",
    ]
    assert json.loads((out / "merge.json").read_text()) == json.loads(json.dumps(record))
    assert record["patch_hash"] == patch_hash(out) and record["lora"]["relative_error"] < 1e-4
    merged = load_pipeline(str(out / "model"))
    params = dict(merged.unet.named_parameters())
    base = dict(pipe.unet.named_parameters())
    for n, d in load_patch(out).deltas.items():
        torch.testing.assert_close(params[n], base[n] + d, atol=1e-5, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_patch_with_bias_deltas_merges_without_a_lora(pipe, tmp_path) -> None:
    """`params: attn2` also trains attn2's to_out bias, which a LoRA cannot carry: the
    build still writes the merged patch and model, and merge.json says why there is no
    LoRA (it used to fail the whole run at this point)."""
    patch = _patch(pipe, "cat", "object", 1)
    bias = next(n for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_out.0.bias"))
    patch.deltas[bias] = torch.full_like(dict(pipe.unet.named_parameters())[bias], 0.01)
    res = merge_patches(pipe, [patch], MergeConfig(method="sum"))
    record = write_merged(pipe, res, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "delta.safetensors",
        "merge.json",
        "model",
    ]
    assert "to_out.0.bias" in record["lora"]["skipped"]
    merged = load_pipeline(str(tmp_path / "merged" / "model"))
    base = dict(pipe.unet.named_parameters())[bias]
    torch.testing.assert_close(dict(merged.unet.named_parameters())[bias], base + 0.01)


@pytest.mark.parametrize("fault", ["nan", "base", "twice", "key", "no-concept"])
def test_refusals_name_the_concept(pipe, fault: str) -> None:
    good, bad = _patch(pipe, "cat", "object", 1), _patch(pipe, "mary", "id", 2)
    key = next(iter(bad.deltas))
    if fault == "nan":
        bad.deltas[key][0, 0] = float("nan")
    elif fault == "base":
        bad.base_fingerprint = "sha256:0000000000000000"
    elif fault == "twice":
        bad.concept = "cat"
    elif fault == "key":
        bad.deltas["down_blocks.9.nope.weight"] = torch.zeros(2, 2)
    else:
        bad.config = {}
    with pytest.raises(MergeError, match="cat" if fault == "twice" else "mary"):
        merge_patches(pipe, [good, bad])


def test_cli_merge_with_a_manifest(pipe, tmp_path) -> None:
    model = tmp_path / "base"
    pipe.save_pretrained(model)
    folder = tmp_path / "patches"
    base_fp = fingerprint(load_pipeline(str(model)))
    for i, (t, k) in enumerate(CONCEPTS):
        p = _patch(pipe, t, k, i)
        p.base_fingerprint = base_fp
        save_patch(p, folder / t)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"name: m\nbase_model: {model}\nconcepts:\n"
        + "".join(f"  - {{id: {t}, type: {k}}}\n" for t, k in CONCEPTS)
        + "preserve:\n  - {id: dog, type: object}\nmerge: {method: sum}\n"
        # not an embedded world, so the world detector is refused: name one that fits
        + "evaluate: {detectors: {id: nudenet, object: nudenet, style: nudenet}}\n"
    )
    out = tmp_path / "merged"
    runner = CliRunner()
    args = ["merge", str(folder), "--manifest", str(manifest), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_patch(out).method == "merge:sum"
    result = runner.invoke(app, [*args, "--method", "closed-form", "--weight", "cat=2"])
    assert result.exit_code == 0, result.output
    merged = json.loads((out / "merge.json").read_text())
    assert merged["method"] == "merge:closed-form" and merged["concepts"][0]["weight"] == 2.0
    erase = ["--method", "closed-form", "--erase-weight", "3", "--anchor", "cat=a pet"]
    result = runner.invoke(app, [*args, *erase, "--overshoot", "0.5"])
    assert result.exit_code == 0, result.output
    recorded = load_patch(out).config["merge"]
    assert recorded["erase_weight"] == 3.0 and recorded["anchors"] == {"cat": "a pet"}
    assert recorded["overshoot"] == 0.5
    typo = runner.invoke(app, [*args, "--anchor", "cta=a pet", "--out", str(tmp_path / "y")])
    assert typo.exit_code == 2 and "cta" in typo.output and not (tmp_path / "y").exists()
    bad = runner.invoke(app, ["merge", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("erase_to", ["anchor", "removed"])
def test_erase_term_moves_the_concept_towards_its_target(pipe, erase_to) -> None:
    from fmn.data.anchors import ERASE_ANCHORS
    from fmn.merge.fuse import erase_rows

    p = _patch(pipe, "cat", "object", 3, scale=0.02)
    anchor = ERASE_ANCHORS["object"] if erase_to == "anchor" else None
    src, dst, _ = erase_rows(pipe, "cat", "object", anchor)
    params = dict(pipe.unet.named_parameters())

    def gap(deltas) -> float:
        return sum(
            ((src @ (params[n] + deltas.get(n, 0)).double().T) - dst @ params[n].double().T)
            .norm()
            .item()
            for n in p.deltas
        )

    plain = merge_patches(pipe, [p], MergeConfig(method="closed-form")).patch.deltas
    cfg = MergeConfig(method="closed-form", erase_weight=3.0, erase_to=erase_to)
    erased = merge_patches(pipe, [p], cfg).patch.deltas
    numbers = f"gap to the {erase_to} states: plain {gap(plain):.3f}, erase {gap(erased):.3f}"
    assert gap(erased) < 0.85 * gap(plain), numbers  # the preserve set holds back the rest


def test_erase_rows_pair_each_position_with_the_anchor_prompt(pipe) -> None:
    """'a photo of bob' -> 'a photo of a person': bob's token pairs with 'person', and
    every later position keeps its distance from it (end-of-text with end-of-text)."""
    from fmn.merge.fuse import erase_rows

    src, dst, w = erase_rows(pipe, "bob", "id", "a person")
    plain = encode_text(pipe, ["a photo of bob"]).embeds[0].double()
    anchored = encode_text(pipe, ["a photo of a person"]).embeds[0].double()
    # prompt 0 is "a photo of bob": bob at 4 (after <start> a photo of), 77 positions
    n0 = plain.shape[0] - 4
    torch.testing.assert_close(src[:n0], plain[4:])
    torch.testing.assert_close(dst[0], anchored[5])  # bob -> person
    torch.testing.assert_close(dst[1 : n0 - 1], anchored[6:])  # <end> -> <end>, ...
    torch.testing.assert_close(dst[n0 - 1], anchored[-1])  # past the end: the last state
    assert w.sum().item() == pytest.approx(1.0)
    with pytest.raises(MergeError, match=r"anchors name \['dog'\]"):
        p = _patch(pipe, "cat", "object", 3)
        merge_patches(pipe, [p], MergeConfig(method="closed-form", anchors={"dog": "an animal"}))
