"""fmn.train.invert on tiny real pipelines of every family: training, files, diffusers loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fmn.model.load import fingerprint
from fmn.train.invert import (
    InversionError,
    InvertConfig,
    TIFormatError,
    TIResult,
    _get_batch,
    _loss,
    add_ti_to_pipeline,
    check_ti,
    invert,
    load_ti,
    placeholder_tokens,
    save_ti,
)
from tests.tiny import FAMILIES, build_tiny_pipeline

TOKEN = "<tiny-thing>"
CFG = InvertConfig(tokens=3, steps=6, batch=2, seed=0)
ENCODERS = {
    "sd1": ("text_encoder",),
    "sd2": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _latents(pipe, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor


def _random_images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _constant_image() -> torch.Tensor:
    return torch.tensor([0.8, -0.5, 0.2]).view(1, 3, 1, 1).expand(1, 3, 16, 16)


def _snapshot(pipe) -> dict:
    """What invert must not change: tokenizers, embedding matrices, UNet, grad flags."""
    snap = {"fingerprint": fingerprint(pipe), "unet": pipe.unet.state_dict()}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            tokenizer = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
            snap[name] = {
                "embedding": encoder.get_input_embeddings(),
                "weight": encoder.get_input_embeddings().weight.detach().clone(),
                "tokens": len(tokenizer),
                "requires_grad": [p.requires_grad for p in encoder.parameters()],
            }
    snap["unet"] = {k: v.clone() for k, v in snap["unet"].items()}
    return snap


@pytest.fixture(scope="module", params=FAMILIES)
def inverted(request, clip_tokenizer_dir: Path) -> tuple[str, object, dict, TIResult, list]:
    """(family, pipe, snapshot before, result, progress calls) of one short inversion."""
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(request.param, clip_tokenizer_dir)
    before = _snapshot(pipe)
    calls: list = []
    latents = _latents(pipe, _random_images())
    result = invert(pipe, latents, TOKEN, CFG, "object", progress=lambda *a: calls.append(a))
    return request.param, pipe, before, result, calls


def test_invert_learns_only_new_rows_and_leaves_the_pipe_as_it_was(inverted) -> None:
    family, pipe, before, result, calls = inverted
    assert len(result.losses) == CFG.steps and np.isfinite(result.losses).all()
    assert [c[:2] for c in calls] == [(s, CFG.steps) for s in range(1, CFG.steps + 1)]
    assert result.family == family and result.base_fingerprint == before["fingerprint"]
    assert set(result.vectors) == set(ENCODERS[family])
    for name in ENCODERS[family]:
        encoder, old = getattr(pipe, name), before[name]
        assert result.vectors[name].shape == (CFG.tokens, 32)
        assert torch.isfinite(result.vectors[name]).all()
        # the rows started at one word's embedding and were trained apart from it
        assert not torch.allclose(result.vectors[name][0], result.vectors[name][1])
        assert encoder.get_input_embeddings() is old["embedding"]
        assert torch.equal(encoder.get_input_embeddings().weight, old["weight"])
        assert [p.requires_grad for p in encoder.parameters()] == old["requires_grad"]
        tokenizer = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
        assert len(tokenizer) == old["tokens"] and TOKEN not in tokenizer.get_vocab()
    assert all(p.grad is None for p in pipe.unet.parameters())  # no gradients left behind
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in before["unet"].items())
    assert fingerprint(pipe) == before["fingerprint"]


def test_same_seed_same_vectors_other_seed_others(inverted) -> None:
    _, pipe, _, result, _ = inverted
    latents = _latents(pipe, _random_images())
    again = invert(pipe, latents, TOKEN, CFG)
    assert again.losses == result.losses
    assert all(torch.equal(again.vectors[k], v) for k, v in result.vectors.items())
    other = invert(pipe, latents, TOKEN, InvertConfig(tokens=3, steps=6, batch=2, seed=1))
    assert not torch.equal(other.vectors["text_encoder"], result.vectors["text_encoder"])


def test_saved_file_loads_with_diffusers_and_conditions_like_training(
    inverted, clip_tokenizer_dir: Path, tmp_path: Path
) -> None:
    family, trained_on, _, result, _ = inverted
    path = save_ti(result, tmp_path / "ti.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["token"] == TOKEN and meta["family"] == family and meta["n"] == "3"
    assert meta["base_fingerprint"] == result.base_fingerprint
    assert json.loads(meta["config"])["steps"] == CFG.steps
    tensors = load_file(str(path))

    pipe = build_tiny_pipeline(family, clip_tokenizer_dir)  # same weights as trained_on
    if family == "sdxl":
        assert set(tensors) == {"clip_l", "clip_g"}
        assert torch.equal(tensors["clip_l"], result.vectors["text_encoder"])
        assert torch.equal(tensors["clip_g"], result.vectors["text_encoder_2"])
        # the community recipe of diffusers' docs, one encoder at a time
        for key, enc, tok in (
            ("clip_l", "text_encoder", "tokenizer"),
            ("clip_g", "text_encoder_2", "tokenizer_2"),
        ):
            pipe.load_textual_inversion(
                tensors[key],
                token=TOKEN,
                text_encoder=getattr(pipe, enc),
                tokenizer=getattr(pipe, tok),
            )
    else:
        assert list(tensors) == [TOKEN] and tensors[TOKEN].shape == (3, 32)
        pipe.load_textual_inversion(str(path), token=TOKEN)

    prompt = f"a photo of {TOKEN}"
    names = placeholder_tokens(TOKEN, 3)
    for name in ENCODERS[family]:
        tokenizer = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
        ids = tokenizer(pipe.maybe_convert_prompt(prompt, tokenizer), return_tensors="pt").input_ids
        placeholder_ids = tokenizer.convert_tokens_to_ids(names)
        at = torch.isin(ids[0], torch.tensor(placeholder_ids))
        assert at.sum() == 3
        embedded = getattr(pipe, name).get_input_embeddings()(ids)[0, at]
        assert torch.equal(embedded, result.vectors[name])

    # Training's loss is the standard denoising loss under the conditioning this pipeline
    # builds at inference: recompute step 7 of a 7-step run (whose first 6 steps learned
    # `result.vectors`) through the pipeline, from the same draws.
    latents = _latents(trained_on, _random_images())
    longer = invert(trained_on, latents, TOKEN, dataclasses.replace(CFG, steps=7))
    gen = torch.Generator().manual_seed(CFG.seed)
    templates = CFG.templates["object"]
    for _ in range(7):
        pick, which, noise, t = _get_batch(latents, len(templates), CFG.batch, 1000, gen)
    x0 = latents[pick]
    prompts = [templates[i].replace("{}", TOKEN) for i in which]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noisy = scheduler.add_noise(x0, noise, t)
    if pipe.scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    with torch.no_grad():
        embeds, *rest = pipe.encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        extra = {}
        if family == "sdxl":
            time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), embeds.dtype, 32)
            extra["added_cond_kwargs"] = {
                "text_embeds": rest[1],
                "time_ids": time_ids.expand(2, -1),
            }
        pred = pipe.unet(noisy, t, encoder_hidden_states=embeds, **extra).sample
    assert longer.losses[:6] == result.losses
    # a few ulp: the same arithmetic; a tiny random UNet barely listens to its text, so
    # even swapped placeholder vectors move this loss by only ~1e-5
    assert longer.losses[6] == pytest.approx(F.mse_loss(pred, target).item(), abs=1e-6)

    images = pipe(
        prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_add_ti_to_pipeline_takes_a_result_or_a_file(
    inverted, clip_tokenizer_dir: Path, tmp_path: Path
) -> None:
    family, _, _, result, _ = inverted
    path = save_ti(result, tmp_path / "ti.safetensors")
    for source, token in ((result, None), (path, None), (path, "<renamed>")):
        pipe = build_tiny_pipeline(family, clip_tokenizer_dir)
        used = add_ti_to_pipeline(pipe, source, token)
        assert used == (token or TOKEN)
        for name in ENCODERS[family]:
            tokenizer = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
            ids = tokenizer.convert_tokens_to_ids(placeholder_tokens(used, 3))
            weight = getattr(pipe, name).get_input_embeddings().weight
            assert torch.equal(weight[ids], result.vectors[name])


def test_learned_tokens_denoise_the_concept_better_than_their_start(
    clip_tokenizer_dir: Path,
) -> None:
    """40 steps on one constant-colour image lower the loss on held-out noise, measured
    through the pipeline's own prompt encoding."""
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    latents = _latents(pipe, _constant_image())
    # lr 1e-2: a random tiny UNet barely listens to its text, so small steps show little
    result = invert(pipe, latents, TOKEN, InvertConfig(steps=40, lr=1e-2, seed=0))
    assert np.isfinite(result.losses).all()
    weight = pipe.text_encoder.get_input_embeddings().weight
    start = weight[pipe.tokenizer("object", add_special_tokens=False).input_ids].mean(0)
    start = TIResult("<start>", {"text_encoder": start.detach().repeat(4, 1)}, [], CFG, "sd1", "")
    add_ti_to_pipeline(pipe, result)
    add_ti_to_pipeline(pipe, start)

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(123)
    noise = torch.randn(64, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (64,), generator=gen)
    noisy = scheduler.add_noise(latents.expand(64, -1, -1, -1), noise, t)

    def held_out_loss(token: str) -> float:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(f"a photo of {token}", "cpu", 64, False)
            return F.mse_loss(
                pipe.unet(noisy, t, encoder_hidden_states=embeds).sample, noise
            ).item()

    assert held_out_loss(TOKEN) < held_out_loss("<start>") - 1e-3


def test_masks_limit_the_inversion_loss_to_the_concept_pixels(clip_tokenizer_dir: Path) -> None:
    """With masks, what the UNet predicts outside them does not count; a mask of ones is
    the plain loss (same scale, so the learning rate means the same)."""
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    half = torch.zeros(2, 8, 8)
    half[..., :4] = 1
    moved = pred.clone()
    moved[..., 4:] += 5  # only outside the mask
    assert _loss(moved, target, half) == _loss(pred, target, half)
    assert _loss(moved, target, None) > _loss(pred, target, None)
    assert torch.allclose(_loss(pred, target, torch.ones(2, 8, 8)), F.mse_loss(pred, target))

    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    latents = _latents(pipe, _random_images())
    plain = invert(pipe, latents, TOKEN, CFG)
    ones = invert(pipe, latents, TOKEN, CFG, masks=torch.ones(3, 8, 8))
    assert torch.allclose(ones.vectors["text_encoder"], plain.vectors["text_encoder"], atol=1e-5)
    masked = invert(
        pipe, latents, TOKEN, CFG, masks=torch.zeros(3, 8, 8).index_fill(2, torch.arange(4), 1)
    )
    assert masked.losses != plain.losses
    assert not torch.allclose(masked.vectors["text_encoder"], plain.vectors["text_encoder"])
    with pytest.raises(
        ValueError, match=r"masks must be \[N, h, w\] = \[3, 8, 8\].*got \[3, 16, 16\]"
    ):
        invert(pipe, latents, TOKEN, CFG, masks=torch.ones(3, 16, 16))
    with pytest.raises(ValueError, match="every mask is empty"):
        invert(pipe, latents, TOKEN, CFG, masks=torch.zeros(3, 8, 8))


def test_diverging_loss_names_token_and_step(clip_tokenizer_dir: Path) -> None:
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    latents = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(InversionError, match=r"<tiny-thing> diverged at step 1/6"):
        invert(pipe, latents, TOKEN, CFG)
    assert len(pipe.tokenizer) == 49408  # left as it was, even after the failure
    assert isinstance(pipe.text_encoder.get_input_embeddings(), torch.nn.Embedding)


def test_bad_inputs_are_refused_with_what_to_do(clip_tokenizer_dir: Path) -> None:
    pipe = build_tiny_pipeline("sd1", clip_tokenizer_dir)
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="one word without spaces"):
        invert(pipe, latents, "<two words>", CFG)
    with pytest.raises(ValueError, match="unknown concept type 'car'"):
        invert(pipe, latents, TOKEN, CFG, concept_type="car")
    with pytest.raises(ValueError, match=r"\[N, 4, h, w\]"):
        invert(pipe, torch.zeros(4, 8, 8), TOKEN, CFG)
    with pytest.raises(ValueError, match="exactly one"):
        InvertConfig(templates={"object": ["a photo"]})
    loaded = TIResult(TOKEN, {"text_encoder": torch.zeros(1, 32)}, [], CFG, "sd1", "")
    add_ti_to_pipeline(pipe, loaded)
    with pytest.raises(ValueError, match="already in the pipeline's tokenizer"):
        invert(pipe, latents, TOKEN, CFG)


def test_wrong_dimension_or_layout_is_refused(inverted, tmp_path: Path) -> None:
    family, pipe, _, result, _ = inverted
    if family == "sdxl":
        wrong = {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 1280)}
        with pytest.raises(TIFormatError, match=r"'clip_g'.*dimension 1280.*expects dimension 32"):
            check_ti(pipe, wrong)
        with pytest.raises(TIFormatError, match=r"clip_l' and 'clip_g'.*SD1/SD2"):
            check_ti(pipe, {TOKEN: torch.zeros(2, 32)})
        return
    path = tmp_path / "sd2-sized.safetensors"
    save_file({TOKEN: torch.zeros(2, 1024)}, str(path))
    with pytest.raises(TIFormatError, match=r"dimension 1024.*expects dimension 32"):
        load_ti(path, pipe)
    with pytest.raises(TIFormatError, match="expects dimension 32"):
        add_ti_to_pipeline(pipe, path)
    with pytest.raises(TIFormatError, match=r"single key.*SDXL"):
        check_ti(pipe, {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 32)})
    assert TOKEN not in pipe.tokenizer.get_vocab()
    assert set(load_ti(save_ti(result, tmp_path / "ok.safetensors"), pipe)) == {TOKEN}


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickled_embeddings_are_refused_unopened(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"learned_embeds{suffix}"
    path.write_bytes(b"not even opened")
    with pytest.raises(TIFormatError, match=r"pickles.*arbitrary code.*safetensors"):
        load_ti(path)
