"""Joint re-steering: several concepts take turns in one patch, through the same loop as
single and batched re-steering (fmn.train.resteer.resteer_loop)."""

from __future__ import annotations

import pytest
import torch

from fmn.data.anchors import anchor_prompts
from fmn.data.prepare import prepare_concept
from fmn.model.conditioning import encode_text
from fmn.train.resteer import ResteerConfig, resteer, resteer_joint


@pytest.fixture(scope="module")
def concepts(tiny):
    star = prepare_concept(tiny, "star", "object", "star", generate=4)
    carol = prepare_concept(tiny, "carol", "id", "carol", generate=4, seed=1)
    anchors = encode_text(tiny, anchor_prompts({"star", "carol"})[:8], image_hw=(16, 16))
    return [star, carol], anchors


def test_joint_takes_turns_and_leaves_the_pipe(tiny, concepts) -> None:
    datas, anchors = concepts
    cfgs = [ResteerConfig(steps=3, lr=1e-2), ResteerConfig(steps=2, lr=1e-2, preserve_weight=0)]
    before = {n: p.clone() for n, p in tiny.unet.named_parameters()}
    seen = []
    res = resteer_joint(tiny, datas, cfgs, anchors=anchors, progress=lambda *a: seen.append(a))
    assert all(torch.equal(before[n], p) for n, p in tiny.unet.named_parameters())
    assert res.concept_id == "star,carol"
    assert len(res.losses) == 5, "every concept gets its own step count"
    assert [s[:2] for s in seen] == [(i, 5) for i in range(1, 6)]
    assert res.deltas and all(v.abs().max() > 0 for v in res.deltas.values())
    assert [c["steps"] for c in res.config["joint"]] == [3, 2]


def test_a_concept_owed_no_steps_changes_nothing(tiny, concepts) -> None:
    (star, carol), anchors = concepts
    cfg = ResteerConfig(steps=3, lr=1e-2, positions="concept+eot")
    alone = resteer(tiny, star, cfg, anchors=anchors)
    joint = resteer_joint(
        tiny, [star, carol], [cfg, ResteerConfig(steps=0, lr=1e-2)], anchors=anchors
    )
    assert joint.losses == alone.losses
    assert joint.deltas.keys() == alone.deltas.keys()
    assert all(torch.equal(joint.deltas[n], v) for n, v in alone.deltas.items())


def test_joint_concepts_share_one_optimiser(tiny, concepts) -> None:
    datas, anchors = concepts
    cfgs = [ResteerConfig(steps=1), ResteerConfig(steps=1, lr=1e-2)]
    with pytest.raises(ValueError, match="shares params, lr, batch and seed"):
        resteer_joint(tiny, datas, cfgs, anchors=anchors)
