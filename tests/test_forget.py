"""One concept, every family: (TI) -> re-steer -> patch -> apply -> LoRA export -> reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmn.data.prepare import prepare_concept
from fmn.model.load import fingerprint
from fmn.model.patch import apply_patch, export_lora, load_patch, revert_patch, save_patch
from fmn.train.forget import forget_concept
from fmn.train.invert import InvertConfig, invert, load_ti
from fmn.train.resteer import ResteerConfig
from tests.tiny import FAMILIES, build_tiny_pipeline


def _images(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of a star", num_inference_steps=2, generator=g, output_type="np").images


@pytest.mark.parametrize("family", FAMILIES)
def test_forget_chain(family: str, clip_tokenizer_dir, tmp_path) -> None:
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(family, clip_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    base_fp = fingerprint(pipe)
    res = forget_concept(
        pipe,
        "star",
        "object",
        "star",
        ResteerConfig(steps=2, lr=1e-2, preserve_weight=1.0),
        invert_cfg=InvertConfig(steps=2, tokens=2),
        generate=2,
    )
    assert fingerprint(pipe) == base_fp, "the base pipeline is left unchanged (TI unloaded too)"
    assert len(pipe.tokenizer) == 49408
    assert res.patch.method == "resteer+ti" and res.patch.base_fingerprint == base_fp
    assert res.ti is not None and set(res.ti.vectors) >= {"text_encoder"}
    if family == "sdxl":
        assert "text_encoder_2" in res.ti.vectors, "SDXL learns both text encoders"

    save_patch(res.patch, tmp_path / "p")
    patch = load_patch(tmp_path / "p")
    before = _images(pipe)
    apply_patch(pipe, patch)
    patched = _images(pipe)
    assert np.abs(patched - before).max() > 0, "the patch changes what the model draws"
    revert_patch(pipe, patch)
    assert fingerprint(pipe) == base_fp

    report = export_lora(patch, tmp_path / "lora.safetensors")
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors", adapter_name="star")
    lora = _images(pipe)
    assert np.abs(lora - patched).max() < 1e-4, (
        f"LoRA reproduces the patch ({report['relative_error']:.1e})"
    )
    from fmn.train.invert import save_ti

    save_ti(res.ti, tmp_path / "ti.safetensors")
    assert load_ti(tmp_path / "ti.safetensors", pipe)


def test_forget_with_attention_masks_records_them(clip_tokenizer_dir) -> None:
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    cfg = ResteerConfig(steps=2, lr=1e-2)
    masked = forget_concept(pipe, "star", "object", "star", cfg, generate=2, mask="attention")
    plain = forget_concept(pipe, "star", "object", "star", cfg, generate=2, mask="none")
    record = masked.patch.config["mask_record"]
    assert masked.patch.config["mask"] == "attention"
    assert [p["method"] for p in record["per_image"]] == ["attention", "attention"]
    assert plain.patch.config["mask_record"]["mode"] == "none"
    # the mask changes which pixels enter the loss, so the patches differ
    name = next(iter(plain.patch.deltas))
    assert not torch.equal(masked.patch.deltas[name], plain.patch.deltas[name])


def test_forget_inverts_through_the_concepts_masks(clip_tokenizer_dir) -> None:
    """With a mask, textual inversion learns from the concept's pixels only: forget's tokens
    are those of an inversion given the prepared masks, not those of an unmasked one."""
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    cfg, ti = ResteerConfig(steps=1, lr=1e-2), InvertConfig(steps=3, tokens=2)
    masked = forget_concept(
        pipe, "star", "object", "star", cfg, invert_cfg=ti, generate=2, mask="attention"
    )
    data = prepare_concept(pipe, "star", "object", "star", generate=2, mask="attention")
    assert data.masks is not None and 0 < float(data.masks.mean()) < 1
    direct = invert(pipe, data.latents, "<star>", ti, "object", masks=data.masks)
    unmasked = invert(pipe, data.latents, "<star>", ti, "object")
    assert masked.ti is not None
    assert torch.equal(masked.ti.vectors["text_encoder"], direct.vectors["text_encoder"])
    assert not torch.equal(masked.ti.vectors["text_encoder"], unmasked.vectors["text_encoder"])
