"""Anchor checks: the base model judges whether an erase anchor draws one of the targets,
and the merge picks the anchor it judges clean. The world's classifier is not used: the
world only supplies a base model that draws known things ("dog" draws squares)."""

from __future__ import annotations

import pytest
import torch

from fmn.merge.anchor_check import check_anchor, choose_anchor
from fmn.merge.fuse import MergeConfig, merge_patches
from fmn.model.load import load_pipeline
from fmn.model.patch import save_patch
from fmn.world import EMBEDDED_NAME
from tests.test_merge import _patch


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_pipeline(EMBEDDED_NAME)


def test_the_base_model_sees_which_anchor_draws_a_target(world) -> None:
    """On the world's base model "a photo of a dog" draws squares and "a photo of a clock"
    draws circles (docs/merge.md): erasing square towards "dog" would put squares back."""
    dog = check_anchor(world, "dog", "object", ["square", "triangle"], ["circle"])
    clock = check_anchor(world, "clock", "object", ["square", "triangle"], ["circle"])
    numbers = f"dog judged {dog.judged}, clock judged {clock.judged} (of 8 images each)"
    assert dog.drawn.get("square", 0) >= 5 and dog.share >= 0.6, numbers
    assert clock.share <= 0.25 and clock.judged.get("circle", 0) >= 5, numbers
    best, checks = choose_anchor(
        world, "object", ["square", "triangle"], ["circle"], ["dog", "square", "clock"]
    )
    assert best == "clock", numbers
    assert [c.anchor for c in checks] == ["dog", "clock"]  # a target is never its own anchor


def test_check_runs_on_every_family(tiny) -> None:
    c = check_anchor(tiny, "a thing", "object", ["cat"], ["dog"], images=2)
    assert sum(c.judged.values()) == 2 and set(c.judged) <= {"", "cat", "dog"}
    assert 0.0 <= c.share <= 1.0


def test_merge_uses_the_chosen_anchors_and_records_every_check(
    clip_tokenizer_dir, tmp_path, monkeypatch
) -> None:
    import fmn.merge.fuse as fuse
    from tests.tiny import build_tiny_pipeline

    # one family: the judging itself runs on every family above; a few candidate words
    # per type (the shipped lists are ~44 words, ~20 s of judging here)
    few = {"object": ["dog", "cat", "car"], "id": ["a man", "a woman"]}
    monkeypatch.setattr(fuse, "GENERIC_WORDS", few)
    tiny = build_tiny_pipeline("sd1", clip_tokenizer_dir, seed=0)
    patches = [_patch(tiny, "cat", "object", 1, 0.02), _patch(tiny, "mary", "id", 2, 0.02)]
    files = [save_patch(p, tmp_path / p.concept) for p in patches]  # read by metadata first
    cfg = MergeConfig(
        erase_weight=3.0, choose_anchors=True, anchors={"mary": "a woman"}, anchor_images=1
    )
    res = merge_patches(tiny, files, cfg)
    chosen = {c["type"]: c["anchor"] for c in res.anchor_checks if c["chosen"]}
    assert set(chosen) == {"object", "id"}  # one anchor per type, "cat" never a candidate
    assert all(c["anchor"] != "cat" for c in res.anchor_checks)
    used = res.patch.config["merge"]["anchors"]
    assert used == {"cat": chosen["object"], "mary": "a woman"}  # the manifest's own wins
    # the fit is the one an explicit choice of the same anchors gives
    explicit = MergeConfig(erase_weight=3.0, anchors=used)
    again = merge_patches(tiny, files, explicit).patch.deltas
    for n, d in res.patch.deltas.items():
        torch.testing.assert_close(d, again[n])
    assert res.patch.extra["anchor_checks"] == res.anchor_checks
