"""fmn.model.load on tiny real pipelines of every family, saved to and loaded from disk."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fmn.model.load import (
    ModelLoadError,
    ModelNotFoundError,
    embedded_path,
    fingerprint,
    load_pipeline,
    model_family,
    model_info,
)
from tests.tiny import FAMILIES, build_tiny_pipeline, save_single_file_sd1


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, clip_tokenizer_dir: Path, tmp_path_factory) -> tuple[str, Path]:
    """(family, diffusers directory) of a tiny pipeline saved once per family."""
    out = tmp_path_factory.mktemp(request.param)
    build_tiny_pipeline(request.param, clip_tokenizer_dir).save_pretrained(out)
    return request.param, out


@pytest.fixture(scope="module")
def sd1_dir(clip_tokenizer_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd1-only")
    build_tiny_pipeline("sd1", clip_tokenizer_dir).save_pretrained(out)
    return out


def test_directory_loads_with_family_and_generates(saved: tuple[str, Path]) -> None:
    family, path = saved
    pipe = load_pipeline(path)
    info = model_info(pipe)
    assert model_family(pipe) == info.family == family
    assert info.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert info.sample_size == 16  # 8x8 latents, VAE that halves once
    assert info.cross_attention_dim == (64 if family == "sdxl" else 32)
    expected_encoders = (
        ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    )
    assert info.text_encoders == expected_encoders
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.unet.dtype == torch.float32
    images = pipe(
        "a photo of a red circle",
        num_inference_steps=2,
        height=info.sample_size,
        width=info.sample_size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 16, 16, 3)
    assert np.isfinite(images).all()


def test_fingerprint_is_stable_and_tracks_every_weight(saved: tuple[str, Path]) -> None:
    _, path = saved
    first, second = load_pipeline(path), load_pipeline(path)
    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(first).startswith("sha256:") and len(fingerprint(first)) == 7 + 16
    with torch.no_grad():
        first.unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(first) != fingerprint(second)
    with torch.no_grad():
        first.unet.conv_in.weight[0, 0, 0, 0] -= 1e-3
        second.text_encoder.final_layer_norm.bias[0] += 1e-3
    assert fingerprint(first) != fingerprint(second)


def test_fp16_files_upcast_and_fingerprint_matches_across_dtypes(
    clip_tokenizer_dir: Path, tmp_path: Path
) -> None:
    build_tiny_pipeline("sd1", clip_tokenizer_dir).to(torch.float16).save_pretrained(tmp_path)
    as_fp32 = load_pipeline(tmp_path, dtype=torch.float32)
    as_fp16 = load_pipeline(tmp_path, dtype=torch.float16)
    assert as_fp32.unet.dtype == torch.float32 and as_fp32.text_encoder.dtype == torch.float32
    assert as_fp16.unet.dtype == torch.float16
    assert fingerprint(as_fp32) == fingerprint(as_fp16)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_outdated_steps_offset_is_fixed_quietly(
    family: str, clip_tokenizer_dir: Path, tmp_path: Path
) -> None:
    build_tiny_pipeline(family, clip_tokenizer_dir).save_pretrained(tmp_path)
    config_file = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.pop("steps_offset", None)  # as in old checkpoints; the class default is 0
    config_file.write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(tmp_path)
    assert pipe.scheduler.config.steps_offset == 1
    assert not [w for w in caught if "steps_offset" in str(w.message)]


def test_single_safetensors_file_loads_offline_with_config(sd1_dir: Path, tmp_path: Path) -> None:
    reference = load_pipeline(sd1_dir)
    checkpoint = save_single_file_sd1(reference, tmp_path / "model.safetensors")
    pipe = load_pipeline(checkpoint, config=sd1_dir)
    assert model_family(pipe) == "sd1"
    assert fingerprint(pipe) == fingerprint(reference)
    vae, ref_vae = pipe.vae.state_dict(), reference.vae.state_dict()
    assert vae.keys() == ref_vae.keys()
    assert all(torch.equal(vae[k], ref_vae[k]) for k in vae)
    assert pipe.scheduler.config.steps_offset == 1


def test_single_file_without_config_offline_says_what_to_pass(
    sd1_dir: Path, tmp_path: Path
) -> None:
    checkpoint = save_single_file_sd1(load_pipeline(sd1_dir), tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="config="):
        load_pipeline(checkpoint)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickled_checkpoints_are_refused_unopened(suffix: str, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelLoadError, match=r"\.safetensors"):
        load_pipeline(checkpoint)
    assert not marker.exists()


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=re.escape(str(missing))):
        load_pipeline(missing)


def test_unsupported_pipeline_class_is_named(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        load_pipeline(tmp_path)


def test_directory_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_pipeline(tmp_path)


def test_hub_id_offline_fails_fast_with_advice() -> None:
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_pipeline("fmn-tests/no-such-model")
    assert time.monotonic() - start < 10


def test_unknown_embedded_model_says_how_to_build(monkeypatch, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="the worlds are: tiny-world, crowd-world"):
        load_pipeline("embedded:no-such-world")
    import fmn.model.load as L

    monkeypatch.setattr(L, "embedded_path", lambda name: tmp_path / name)
    with pytest.raises(ModelNotFoundError, match="fmn world build --world crowd-world"):
        load_pipeline("embedded:crowd-world")


@pytest.mark.skipif(
    not (embedded_path() / "model_index.json").is_file(), reason="embedded world not built yet"
)
def test_embedded_world_loads_as_sd1() -> None:
    pipe = load_pipeline("embedded:tiny-world")
    assert model_family(pipe) == "sd1"
    assert pipe.unet.dtype == torch.float32  # stored fp16, upcast for CPU
    assert fingerprint(pipe) == fingerprint(load_pipeline(embedded_path()))


def test_fingerprint_does_not_depend_on_location(sd1_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sd1_dir, tmp_path / "copy"))
    assert fingerprint(load_pipeline(copy)) == fingerprint(load_pipeline(sd1_dir))


def test_safetensors_file_that_is_not_a_checkpoint_is_refused(
    sd1_dir: Path, tmp_path: Path
) -> None:
    not_a_model = tmp_path / "lora.safetensors"
    save_file({"unet.some.lora_A.weight": torch.zeros(4, 4)}, str(not_a_model))
    with pytest.raises(ModelLoadError, match="single-file"):
        load_pipeline(not_a_model, config=sd1_dir)


def test_embedded_spec_resolves_inside_the_package(
    clip_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # laid out as the shipped world will be: fp16 weights plus a classifier/ folder
    world = tmp_path / "tiny-world"
    build_tiny_pipeline("sd1", clip_tokenizer_dir).to(torch.float16).save_pretrained(world)
    (world / "classifier").mkdir()
    monkeypatch.setattr("fmn.model.load.embedded_path", lambda name: tmp_path / name)
    pipe = load_pipeline("embedded:tiny-world")
    assert model_family(pipe) == "sd1"
    assert pipe.unet.dtype == torch.float32
