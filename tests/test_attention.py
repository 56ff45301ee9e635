"""Cross-attention capture and the re-steering loop on tiny pipelines of every family."""

from __future__ import annotations

import pytest
import torch

from fmn.data.anchors import anchor_prompts
from fmn.data.prepare import prepare_concept
from fmn.model.attention import (
    AttentionStore,
    CaptureProcessor,
    attention_loss,
    capture_cross_attention,
    token_weights,
)
from fmn.model.conditioning import encode_text
from fmn.train.resteer import ResteerConfig, ResteerError, resteer


@pytest.fixture(scope="module")
def star(tiny):
    return prepare_concept(tiny, "star", "object", "star", generate=4)


def _unet_out(pipe, data):
    embeds, kwargs = data.cond.select(torch.arange(2))
    x = torch.randn((2, *data.latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    return pipe.unet(x, torch.tensor([500, 500]), encoder_hidden_states=embeds, **kwargs).sample


@torch.no_grad()
def test_capture_changes_nothing_and_restores_processors(tiny, star) -> None:
    originals = dict(tiny.unet.attn_processors)
    ref = _unet_out(tiny, star)
    with capture_cross_attention(tiny.unet) as store:
        procs = tiny.unet.attn_processors
        assert all(isinstance(p, CaptureProcessor) for n, p in procs.items() if ".attn2." in n)
        assert not any(isinstance(p, CaptureProcessor) for n, p in procs.items() if ".attn1." in n)
        store.token_weights = token_weights(
            star.cond.input_ids[:2], tiny.tokenizer("star", add_special_tokens=False).input_ids
        )
        out = _unet_out(tiny, star)
        assert len(store.maps) == sum(".attn2." in n for n in procs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert {n: type(p) for n, p in tiny.unet.attn_processors.items()} == {
        n: type(p) for n, p in originals.items()
    }


def test_processors_restored_after_an_error(tiny) -> None:
    before = {n: type(p) for n, p in tiny.unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"), capture_cross_attention(tiny.unet):
        raise RuntimeError("boom")
    assert {n: type(p) for n, p in tiny.unet.attn_processors.items()} == before


def test_token_weight_modes(clip_tokenizer_dir) -> None:
    from fmn.world.tokenizer import load_tokenizer

    tok = load_tokenizer(clip_tokenizer_dir, 77)
    ids = tok(
        ["a photo of a red star"], padding="max_length", max_length=12, return_tensors="pt"
    ).input_ids
    star_id = tok("star", add_special_tokens=False).input_ids
    w = token_weights(ids, star_id, "concept")
    assert w[0].nonzero().flatten().tolist() == [6]
    assert token_weights(ids, star_id, "concept+eot")[0].nonzero().flatten().tolist() == [6, 7]
    # SD1 pads with end-of-text, so all_eot takes every padding position too
    assert token_weights(ids, star_id, "all_eot")[0].nonzero().flatten().tolist() == [
        6,
        7,
        8,
        9,
        10,
        11,
    ]
    with pytest.raises(ValueError, match="not found"):
        token_weights(ids, tok("moon", add_special_tokens=False).input_ids)


def test_loss_respects_the_mask() -> None:
    store = AttentionStore()
    store.latent_hw = (4, 4)
    m = torch.zeros(1, 1, 16)
    m[..., :8] = 0.5  # attention only in the top half
    store.maps = [m]
    top, bottom = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    top[:, :2], bottom[:, 2:] = 1, 1
    assert attention_loss(store, top).item() == pytest.approx(0.5)
    assert attention_loss(store, bottom).item() == pytest.approx(0.0)
    assert attention_loss(store).item() == pytest.approx((0.25 / 2) ** 0.5)


def test_resteer_trains_only_to_kv_and_leaves_the_model(tiny, star) -> None:
    before = {n: p.clone() for n, p in tiny.unet.named_parameters()}
    anchors = encode_text(tiny, anchor_prompts({"star"})[:8], image_hw=star.images.shape[1:3])
    cfg = ResteerConfig(steps=4, lr=1e-2, preserve_weight=1.0, seed=3)
    r1 = resteer(tiny, star, cfg, anchors=anchors)
    assert r1.deltas and all(
        n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in r1.deltas
    )
    assert all(torch.equal(before[n], p) for n, p in tiny.unet.named_parameters()), (
        "pipe must be unchanged"
    )
    assert all(torch.isfinite(torch.tensor(r1.losses)))
    r2 = resteer(tiny, star, cfg, anchors=anchors)
    assert all(torch.equal(r1.deltas[n], r2.deltas[n]) for n in r1.deltas), "same seed, same patch"


def test_nan_loss_stops_the_concept_by_name(tiny, star) -> None:
    from dataclasses import replace

    bad = replace(star, latents=star.latents * float("nan"))
    with pytest.raises(ResteerError, match=r"concept 'star'.*step 0"):
        resteer(tiny, bad, ResteerConfig(steps=2))
    assert all(torch.isfinite(p).all() for p in tiny.unet.parameters())


def test_concept_after_takes_every_later_position(clip_tokenizer_dir) -> None:
    from fmn.world.tokenizer import load_tokenizer

    tok = load_tokenizer(clip_tokenizer_dir, 77)
    ids = tok(
        ["a star in the style of dots"], padding="max_length", max_length=12, return_tensors="pt"
    ).input_ids
    w = token_weights(ids, tok("star", add_special_tokens=False).input_ids, "concept+after")
    assert w[0].nonzero().flatten().tolist() == list(range(2, 12))


def test_type_defaults_and_overrides() -> None:
    from fmn.train.resteer import resteer_config_for

    assert resteer_config_for("id").positions == "concept"
    assert resteer_config_for("style").positions == "all_eot"
    assert resteer_config_for("style").preserve_weight == 10.0
    assert resteer_config_for("object", preserve_weight=None).preserve_weight == 1.0
    assert resteer_config_for("style", positions="concept", lr=1e-4).positions == "concept"
    assert resteer_config_for("style", lr=1e-4).lr == 1e-4
