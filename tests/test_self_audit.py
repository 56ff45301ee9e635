"""The base model as auditor (fmn.train.judge) and the merge's self-tuning built on it. The
world's classifier is not used: the world only supplies a base model that draws its
concepts, and the erase term removes one without any training."""

from __future__ import annotations

import pytest
import torch

from fmn.merge.fuse import TUNE_GRID, MergeConfig, MergeError, merge_patches
from fmn.model.load import load_pipeline
from fmn.train.judge import self_judged
from fmn.world import EMBEDDED_NAME
from tests.test_merge import _patch


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_pipeline(EMBEDDED_NAME)


def test_the_base_model_sees_an_erased_concept_go(world) -> None:
    concepts = [("carol", "id"), ("alice", "id"), ("triangle", "object"), ("circle", "object")]
    base = self_judged(world, None, concepts)
    cfg = MergeConfig(preserve_weight=10, erase_weight=30, overshoot=0.5)
    # a patch that changes nothing: the merge's erase term alone does the forgetting
    patch = merge_patches(world, [_patch(world, "carol", "id", 0, scale=0.0)], cfg, preserve=[
        ("alice", "id"), ("circle", "object")
    ]).patch  # fmt: skip
    after = self_judged(world, patch, concepts)
    numbers = f"base {base}, after erasing carol {after}"
    assert min(j.share for j in base.values()) >= 0.75, numbers  # it knows the world
    assert after["carol"].share <= 0.25 and after["carol"].margin < 0 < base["carol"].margin, (
        numbers
    )
    assert after["alice"].share >= 0.75, numbers
    assert after["triangle"].share >= 0.75 and after["circle"].share >= 0.75, numbers


def test_overshoot_pushes_the_concept_past_its_anchor(tiny) -> None:
    from fmn.merge.fuse import erase_rows

    p = _patch(tiny, "cat", "object", 3, scale=0.0)
    src, dst, _ = erase_rows(tiny, "cat", "object", "thing")
    params = {n: p.detach() for n, p in tiny.unet.named_parameters()}

    def reach(overshoot: float) -> float:
        cfg = MergeConfig(erase_weight=3.0, overshoot=overshoot)
        d = merge_patches(tiny, [p], cfg).patch.deltas
        moved = sum((src @ d[n].double().T).flatten() @ (
            (dst - src) @ params[n].double().T).flatten() for n in d)  # fmt: skip
        full = sum(((dst - src) @ params[n].double().T).pow(2).sum() for n in d)
        return float(moved / full)  # 1: exactly at the anchor

    plain, past = reach(0.0), reach(1.0)
    assert past > 1.5 * plain, f"share of the way to the anchor: {plain:.3f} vs {past:.3f}"


def test_tune_keeps_the_grid_point_the_base_model_judges_best(clip_tokenizer_dir) -> None:
    from tests.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir, seed=0)
    patches = [_patch(pipe, "cat", "object", 1, 0.02), _patch(pipe, "mary", "id", 2, 0.02)]
    with pytest.raises(MergeError, match="preserve"):
        merge_patches(pipe, patches, MergeConfig(tune=True))
    with pytest.raises(MergeError, match="preserve"):  # only the targets themselves
        merge_patches(pipe, patches, MergeConfig(tune=True), preserve=[("cat", "object")])
    keep = [("dog", "object"), ("john", "id")]
    res = merge_patches(pipe, patches, MergeConfig(tune=True, tune_images=2), preserve=keep)
    table = res.tuning
    assert [(r["preserve_weight"], r["erase_weight"], r["overshoot"]) for r in table] == TUNE_GRID
    best = max(range(len(table)), key=lambda k: (table[k]["self_h"], -k))
    assert [r["chosen"] for r in table] == [k == best for k in range(len(table))]
    a, g, o = TUNE_GRID[best]
    direct = MergeConfig(preserve_weight=a, erase_weight=g, overshoot=o)
    again = merge_patches(pipe, patches, direct, preserve=keep).patch.deltas
    for n, d in res.patch.deltas.items():
        torch.testing.assert_close(d, again[n])
    assert res.patch.extra["tuning"] == table and res.patch.config["merge"]["tune"]
