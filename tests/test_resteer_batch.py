"""Batched re-steering: several concepts share each UNet pass, each gets its own patch,
the same patch it gets alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fmn.data.anchors import anchor_prompts
from fmn.data.prepare import prepare_concept
from fmn.model.conditioning import encode_text
from fmn.train.resteer import ResteerConfig, ResteerError, resteer
from fmn.train.resteer_batch import resteer_batch


@pytest.fixture(scope="module")
def concepts(tiny):
    star = prepare_concept(tiny, "star", "object", "star", generate=4)
    carol = prepare_concept(tiny, "carol", "id", "carol", generate=4, seed=1)
    hw = star.images.shape[1:3]
    anchors = [
        encode_text(tiny, anchor_prompts({text})[:8], image_hw=hw) for text in ("star", "carol")
    ]
    return [star, carol], anchors


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_batched_patches_equal_the_patches_made_alone(tiny, concepts) -> None:
    datas, anchors = concepts
    # different positions, preservation, batch, seeds and step counts per concept
    cfgs = [
        ResteerConfig(steps=5, lr=1e-2, preserve_weight=1.0, seed=3, positions="concept+eot"),
        ResteerConfig(steps=3, lr=5e-3, preserve_weight=0.3, seed=7, batch=2),
    ]
    before = {n: p.clone() for n, p in tiny.unet.named_parameters()}
    batched = resteer_batch(tiny, datas, cfgs, anchors=anchors)
    assert all(torch.equal(before[n], p) for n, p in tiny.unet.named_parameters()), (
        "pipe must be unchanged"
    )
    for data, cfg, anc, got in zip(datas, cfgs, anchors, batched, strict=True):
        alone = resteer(tiny, data, cfg, anchors=anc)
        assert got.concept_id == data.concept_id
        assert len(got.losses) == cfg.steps
        assert got.deltas.keys() == alone.deltas.keys()
        errs = {n: _rel(got.deltas[n], alone.deltas[n]) for n in alone.deltas}
        # float rounding differs with the batch; AdamW's normalisation lifts it to ~1e-3 in
        # weights whose gradient is near zero, and no further
        assert max(errs.values()) < 1e-2, f"{data.concept_id}: batched vs alone {errs}"
        torch.testing.assert_close(
            torch.tensor(got.losses), torch.tensor(alone.losses), rtol=1e-4, atol=1e-6
        )
        assert got.attention_before == pytest.approx(alone.attention_before, rel=1e-4)
        assert got.attention_after == pytest.approx(alone.attention_after, rel=1e-4)


def test_a_nan_concept_is_named(tiny, concepts) -> None:
    (star, carol), anchors = concepts
    bad = replace(carol, latents=carol.latents * float("nan"))
    with pytest.raises(ResteerError, match=r"concept 'carol'.*step 0"):
        resteer_batch(tiny, [star, bad], [ResteerConfig(steps=2)] * 2, anchors=anchors)
    assert all(torch.isfinite(p).all() for p in tiny.unet.parameters())


def test_only_to_kv_can_be_batched(tiny, concepts) -> None:
    datas, anchors = concepts
    cfgs = [ResteerConfig(steps=1), ResteerConfig(steps=1, params="attn2")]
    with pytest.raises(ValueError, match=r"to_k/to_v only.*\['carol'\]"):
        resteer_batch(tiny, datas, cfgs, anchors=anchors)
