"""Tiny, randomly initialised pipelines of each supported family, for fast CPU tests.

The configs follow diffusers' own `get_dummy_components` in its Stable Diffusion, SD2 and
SDXL pipeline tests, with the real 49408-token CLIP tokenizer, so that everything that
depends on the architecture (module names, attention layout, conditioning) is the same as
in a real checkpoint of that family. Latents are 8x8 and the VAE halves once: 16 px images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from fmn.world.tokenizer import CLIP_VOCAB_SIZE

FAMILIES = ("sd1", "sd2", "sdxl")
LATENT_SIZE = 8
TEXT_WIDTH = 32
BOS, EOS = 49406, 49407
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _tokenizer(tokenizer_dir: Path, pad_token: str | None = None) -> CLIPTokenizer:
    # SD2's and SDXL's second (OpenCLIP) tokenizer pad with "!" (id 0), SD1's with end-of-text
    kwargs = {"pad_token": pad_token} if pad_token else {}
    tok = CLIPTokenizer.from_pretrained(
        str(tokenizer_dir), local_files_only=True, model_max_length=77, **kwargs
    )
    assert len(tok) == CLIP_VOCAB_SIZE, f"broken tokenizer at {tokenizer_dir}"
    return tok


def _text_config(hidden_act: str, pad_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,  # quick_gelu in OpenAI CLIP (SD1), gelu in OpenCLIP (SD2, SDXL)
        projection_dim=TEXT_WIDTH,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=pad_token_id,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        sample_size=LATENT_SIZE * 2,
    )


def _unet(**family_kwargs) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **family_kwargs,
    )


def build_tiny_pipeline(family: str, tokenizer_dir: Path, seed: int = 0):
    """An in-memory tiny pipeline of `family` ("sd1", "sd2" or "sdxl"), weights from `seed`.

    The sd1 scheduler deliberately lacks `steps_offset=1` (as many old checkpoints do), so
    tests can check that the loader repairs it.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    vae = _vae()
    if family == "sd1":
        unet = _unet(cross_attention_dim=TEXT_WIDTH)
        text = CLIPTextModel(_text_config("quick_gelu", pad_token_id=EOS))
        scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the steps_offset notice
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text,
                tokenizer=_tokenizer(tokenizer_dir),
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        # the pipeline repairs the scheduler in memory; put the outdated value back
        pipe.scheduler.register_to_config(steps_offset=0)
        return pipe
    if family == "sd2":
        unet = _unet(
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
        text = CLIPTextModel(_text_config("gelu", pad_token_id=0))
        scheduler = DDIMScheduler(
            **SD_BETAS,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=_tokenizer(tokenizer_dir, pad_token="!"),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    unet = _unet(
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # six size/crop numbers x 8 + the pooled projection of text_encoder_2
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
    )
    scheduler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config("quick_gelu", pad_token_id=EOS)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config("gelu", pad_token_id=0)),
        tokenizer=_tokenizer(tokenizer_dir),
        tokenizer_2=_tokenizer(tokenizer_dir, pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """UNet state dict under original (LDM) key names: the inverse of diffusers' converter."""
    cfg = unet.config
    per_block = cfg.layers_per_block + 1  # LDM numbers a down/up block's layers + its sampler
    flat = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    keys = list(unet.state_dict())
    renames: list[tuple[str, str]] = []  # (diffusers prefix, LDM prefix)
    for i in range(len(cfg.block_out_channels)):
        for j in range(cfg.layers_per_block):
            ldm = f"input_blocks.{per_block * i + j + 1}"
            renames += [(f"down_blocks.{i}.resnets.{j}.", f"{ldm}.0.")]
            renames += [(f"down_blocks.{i}.attentions.{j}.", f"{ldm}.1.")]
        renames += [
            (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per_block * (i + 1)}.0.op.")
        ]
        has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
        for j in range(per_block):
            ldm = f"output_blocks.{per_block * i + j}"
            renames += [(f"up_blocks.{i}.resnets.{j}.", f"{ldm}.0.")]
            renames += [(f"up_blocks.{i}.attentions.{j}.", f"{ldm}.1.")]
        last = f"output_blocks.{per_block * i + per_block - 1}"
        renames += [(f"up_blocks.{i}.upsamplers.0.", f"{last}.{2 if has_attn else 1}.")]
    renames += [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
    ]
    renames += [("mid_block.resnets.1.", "middle_block.2.")]
    resnet_parts = [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ]
    out = {}
    for key, value in unet.state_dict().items():
        new = flat.get(key)
        for d_prefix, ldm_prefix in renames if new is None else []:
            if key.startswith(d_prefix):
                new = ldm_prefix + key[len(d_prefix) :]
                if ".resnets." in d_prefix:
                    for d_part, ldm_part in resnet_parts:
                        new = new.replace(f"{ldm_prefix}{d_part}.", f"{ldm_prefix}{ldm_part}.")
                break
        assert new is not None, f"no LDM name for UNet key {key}"
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """VAE state dict under LDM key names (decoder blocks are numbered in reverse there)."""
    n = len(vae.config.block_out_channels)
    flat = DIFFUSERS_TO_LDM_MAPPING["vae"]
    renames = [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.") for i in range(n)]
    renames += [
        (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
        for i in range(n)
    ]
    renames += [
        (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.") for i in range(n)
    ]
    renames += [
        (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        for i in range(n)
    ]
    for part in ("encoder", "decoder"):
        renames += [
            (f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)
        ]
        renames += [(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    attn_parts = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out = {}
    for key, value in vae.state_dict().items():
        new = flat.get(key)
        for d_prefix, ldm_prefix in renames if new is None else []:
            if key.startswith(d_prefix):
                rest = key[len(d_prefix) :].replace("conv_shortcut", "nin_shortcut")
                if ".attentions." in d_prefix:
                    module, leaf = rest.rsplit(".", 1)
                    rest = f"{attn_parts[module]}.{leaf}"
                    if value.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
                        value = value[:, :, None, None]
                new = ldm_prefix + rest
                break
        assert new is not None, f"no LDM name for VAE key {key}"
        out["first_stage_model." + new] = value
    return out


def save_single_file_sd1(pipe: StableDiffusionPipeline, path: Path) -> Path:
    """Write an SD1 pipeline as one original-format (LDM) .safetensors checkpoint.

    This is what A1111/ComfyUI users hold; diffusers' `from_single_file` converts it back.
    """
    text = {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
        for k, v in pipe.text_encoder.state_dict().items()
    }
    tensors = {**_unet_to_ldm(pipe.unet), **_vae_to_ldm(pipe.vae), **text}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return path
