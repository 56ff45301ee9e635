"""A concept reached by several words (`words:`): the manifest, training on every listed
word, merging its patch by all of them, and an audit that scores them all and attacks with
the ones nobody listed."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from fmn.data.prepare import prepare_concept
from fmn.eval.audit import _plan, phrasings_for
from fmn.manifest import ManifestError, parse_manifest
from fmn.merge.fuse import MergeConfig, merge_patches
from fmn.model.attention import token_weights
from fmn.model.conditioning import concept_prompts, encode_text, words_token_ids
from fmn.train.forget import forget_concept
from fmn.train.resteer import ResteerConfig
from tests.tiny import build_tiny_pipeline


def _manifest(concepts: list[dict], **extra):
    data = {"name": "w", "base_model": "embedded:tiny-world", "concepts": concepts, **extra}
    return parse_manifest(yaml.safe_load(yaml.safe_dump(data)), base_dir=".")


def test_words_set_the_text_and_a_given_text_comes_first() -> None:
    m = _manifest(
        [
            {"id": "night", "type": "style", "words": ["night", "midnight"]},
            {"id": "heart", "type": "object", "text": "valentine", "words": ["heart"]},
            {"id": "carol", "type": "id"},
        ]
    )
    got = {c.id: (c.text, c.words) for c in m.resolved_concepts()}
    assert got == {
        "night": ("night", ("night", "midnight")),
        "heart": ("valentine", ("valentine", "heart")),
        "carol": ("carol", ("carol",)),
    }


@pytest.mark.parametrize(
    "words, message",
    [(["night", "dark", "night"], "'night' more than once"), ([], "must not be empty")],
)
def test_bad_words_are_refused_by_field(words, message) -> None:
    with pytest.raises(ManifestError, match=rf"concepts\.0\.words: .*{message}"):
        _manifest([{"id": "night", "type": "style", "words": words}])


def test_each_prompt_weighs_its_own_phrasing(clip_tokenizer_dir) -> None:
    from fmn.world.tokenizer import load_tokenizer

    tok = load_tokenizer(clip_tokenizer_dir, 77)
    prompts = concept_prompts(["night", "after sunset"], "style")[:2]
    assert prompts == ["a picture in the style of night", "a picture in the style of after sunset"]
    ids = tok(prompts, padding="max_length", max_length=12, return_tensors="pt").input_ids
    w = token_weights(ids, words_token_ids(tok, ["night", "after sunset"]), "concept")
    assert w[0].nonzero().flatten().tolist() == [7]
    assert w[1].nonzero().flatten().tolist() == [7, 8]  # both tokens of the phrase
    with pytest.raises(ValueError, match="not found"):
        token_weights(ids, words_token_ids(tok, ["night"]))


@pytest.fixture(scope="module")
def pipe(clip_tokenizer_dir):
    torch.set_num_threads(1)
    p = build_tiny_pipeline("sd1", clip_tokenizer_dir, seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def test_training_images_prompts_and_patch_cover_every_word(pipe) -> None:
    data = prepare_concept(pipe, "night", "style", "night", generate=4, words=["night", "dark"])
    assert data.words == ("night", "dark")
    assert data.record["prompts"][:2] == [
        "a picture in the style of night",
        "a picture in the style of dark",
    ]
    assert {p.split()[-1] for p in data.cond.prompts} == {"night", "dark"}
    res = forget_concept(
        pipe,
        "night",
        "style",
        "night",
        ResteerConfig(steps=2, lr=1e-2, loop=False),
        generate=4,
        words=["night", "dark"],
    )
    assert res.patch.config["concept"]["words"] == ["night", "dark"]
    # the merge's erase term maps every word's prompts towards the anchor: recorded as
    # "night" alone, the merged model leaves "dark" where it was
    dark = encode_text(pipe, concept_prompts("dark", "style")).embeds
    anchor = encode_text(pipe, concept_prompts("painting", "style")).embeds
    kv = {n: p for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight")}

    def gap(patch) -> float:  # of dark's keys from the anchor's, at the end-of-text
        fused = merge_patches(pipe, [patch], MergeConfig(erase_weight=10.0)).patch.deltas
        return sum(
            float(((w + fused[n]) @ (dark[:, -1] - anchor[:, -1]).T).norm()) for n, w in kv.items()
        )

    alone = copy.deepcopy(res.patch)
    del alone.config["concept"]["words"]
    assert gap(res.patch) < 0.8 * gap(alone)
    # a one-word concept's patch records what it always did
    one = forget_concept(
        pipe, "star", "object", "star", ResteerConfig(steps=1, loop=False), generate=2
    )
    assert "words" not in one.patch.config["concept"]


def test_audit_scores_every_listed_word_and_attacks_with_the_others() -> None:
    m = _manifest(
        [{"id": "night", "type": "style", "words": ["night", "midnight"]}],
        preserve=[{"id": "dots", "type": "style"}],
        evaluate={"phrasings": {"night": ["midnight", "after dark"]}, "prompts_per_concept": 4},
    )
    plan = _plan(m, None, None)
    night = plan.prompts["night"]
    assert [p.split()[-1] for p in night] == ["night", "midnight", "night", "midnight"]
    assert all("midnight" not in p for p in plan.prompts["dots"])
    ref = next(r for r in plan.refs if r.id == "night")
    assert phrasings_for(m, ref, world=False) == ["after dark"]  # listed words are no attack
