"""The background hold: with masks, re-steering keeps the cross-attention output outside
the mask where the base model had it (background_loss, ResteerConfig.background_weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmn.data.anchors import anchor_prompts
from fmn.data.prepare import prepare_concept
from fmn.model.attention import AttentionStore, background_loss, capture_cross_attention
from fmn.model.conditioning import encode_text
from fmn.train.resteer import ResteerConfig, base_by_module, resteer, select_params
from fmn.train.resteer_batch import resteer_batch


def _left_half(n: int, hw: tuple[int, int]) -> np.ndarray:
    m = np.zeros((n, *hw), dtype=np.float32)
    m[:, :, : hw[1] // 2] = 1.0
    return m


@pytest.fixture(scope="module")
def star(tiny):
    plain = prepare_concept(tiny, "star", "object", "star", generate=4)
    hw = plain.images.shape[1:3]
    masked = prepare_concept(
        tiny, "star", "object", "star", images=plain.images, masks=_left_half(4, hw)
    )
    return masked, encode_text(tiny, anchor_prompts({"star"})[:8], image_hw=hw)


@torch.no_grad()
def _background_drift(pipe, data, base: dict[str, torch.Tensor], deltas=None) -> float:
    """background_loss of the model with `deltas` added, against `base`, on fixed draws."""
    unet = pipe.unet
    params = dict(unet.named_parameters())
    for n, d in (deltas or {}).items():
        params[n].add_(d)
    try:
        store = AttentionStore()
        store.latent_hw = tuple(data.latents.shape[-2:])
        store.base = base_by_module(unet, base)
        store.hold = True
        gen = torch.Generator().manual_seed(5)
        idx = torch.arange(len(data.latents))
        with capture_cross_attention(unet, store):
            noise = torch.randn(data.latents.shape, generator=gen)
            embeds, kwargs = data.cond.select(idx % len(data.cond.prompts))
            unet(data.latents + noise, torch.full((len(idx),), 500), embeds, **kwargs)
        return float(background_loss(store, data.masks))
    finally:
        for n, d in (deltas or {}).items():
            params[n].sub_(d)


def test_the_hold_measures_only_what_moved_outside_the_mask(tiny, star) -> None:
    data, _ = star
    base = {n: p.detach().clone() for n, p in select_params(tiny.unet, "attn2").items()}
    assert _background_drift(tiny, data, base) == 0.0, "the base model has not moved"
    bump = {n: 0.1 * torch.randn_like(p) for n, p in base.items() if n.endswith("to_v.weight")}
    moved = _background_drift(tiny, data, base, bump)
    assert moved > 1e-4, f"changed values must show outside the mask, got {moved}"
    everything_inside = data.masks.new_ones(data.masks.shape)
    store = AttentionStore()
    store.drift = [(torch.ones(2, 4), torch.ones(2, 4))]
    assert float(background_loss(store, everything_inside[:2])) == 0.0, "no outside, no hold"


def test_masked_resteering_with_the_hold_keeps_the_background(tiny, star) -> None:
    data, anchors = star
    base = {n: p.detach().clone() for n, p in select_params(tiny.unet, "attn2").items()}
    drift = {}
    for weight in (0.0, 10.0):
        cfg = ResteerConfig(steps=8, lr=1e-2, params="attn2", background_weight=weight)
        res = resteer(tiny, data, cfg, anchors=anchors)
        drift[weight] = _background_drift(tiny, data, base, res.deltas)
    assert drift[10.0] < 0.5 * drift[0.0], f"background drift without / with the hold: {drift}"


def test_batched_hold_equals_the_hold_alone(tiny, star) -> None:
    data, anchors = star
    plain = prepare_concept(tiny, "star", "object", "star", images=data.images)
    cfgs = [
        ResteerConfig(steps=4, lr=1e-2, background_weight=3.0, seed=2),
        ResteerConfig(steps=3, lr=5e-3, background_weight=3.0, seed=4),  # no masks: unused
    ]
    got = resteer_batch(tiny, [data, plain], cfgs, anchors=[anchors, anchors])
    for d, cfg, g in zip([data, plain], cfgs, got, strict=True):
        alone = resteer(tiny, d, cfg, anchors=anchors)
        torch.testing.assert_close(
            torch.tensor(g.losses), torch.tensor(alone.losses), rtol=1e-4, atol=1e-6
        )
        for n, v in alone.deltas.items():
            err = float((g.deltas[n] - v).norm() / v.norm().clamp(min=1e-12))
            assert err < 1e-2, f"{n}: batched vs alone {err}"
