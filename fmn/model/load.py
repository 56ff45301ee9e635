"""Load a base text-to-image pipeline, tell its family, and fingerprint its weights.

A model spec is one of:

- `embedded:tiny-world`: the small model that ships inside this package;
- a diffusers pipeline directory (it has `model_index.json`);
- a single-file checkpoint `*.safetensors` (A1111/ComfyUI layout), converted by diffusers'
  `from_single_file`. Offline it needs `config=`: a diffusers directory (or spec) with the
  same architecture, since diffusers would otherwise download the matching configs;
- a Hugging Face hub id such as `runwayml/stable-diffusion-v1-5` (only with network, or
  when it is already in the local hub cache).

Pickled checkpoints (.ckpt, .bin, .pt, .pth) are refused: unpickling runs arbitrary code,
and this tool loads files that other people hand it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from transformers.utils import logging as transformers_logging

import fmn.world
from fmn.manifest import refuse_pickle  # defined there (light)

Family = Literal["sd1", "sd2", "sdxl"]

EMBEDDED_PREFIX = "embedded:"
# model_index.json class -> the text-to-image class we load it as. Img2img directories
# hold the same weights as text-to-image ones; inpainting/depth/upscale UNets do not.
SUPPORTED_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionImg2ImgPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message says what to do instead."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model spec that names a path that does not exist."""


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline needs to know about a loaded model."""

    family: Family
    prediction_type: str  # "epsilon" or "v_prediction"
    cross_attention_dim: int  # width of the text features that attn2's to_k/to_v read
    sample_size: int  # native image side in pixels
    text_encoders: tuple[str, ...]  # pipeline attribute names, e.g. ("text_encoder",)


def embedded_path(name: str = "tiny-world") -> Path:
    """Folder of an embedded model shipped in the package (it may not be built yet)."""
    return fmn.world.EMBEDDED_DIR.parent / name


def load_pipeline(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    local_files_only: bool | None = None,
    config: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a Stable Diffusion 1.x/2.x/XL text-to-image pipeline from a model spec.

    `local_files_only=None` means "offline when HF_HUB_OFFLINE is set". `config` is only
    used for single-file checkpoints: a diffusers directory or spec of the same
    architecture, whose component configs, tokenizer and scheduler are taken.
    Weights are loaded as `dtype` (fp16 files are upcast exactly), safety checker off,
    progress bars off, scheduler `steps_offset` set to 1 as Stable Diffusion was trained.
    A model folder written by a merge with gated concepts carries their eraser
    (fmn.model.eraser.ERASER_FILE); it is installed on the loaded pipeline.
    """
    from fmn.model import eraser

    offline = _hub_offline() if local_files_only is None else local_files_only
    with _quiet_loading():
        pipe = _load(str(spec), dtype=dtype, offline=offline, config=config)
    _check_text_to_image(pipe, str(spec))
    _fix_steps_offset(pipe)
    _ensure_dtype(pipe, dtype)
    pipe.set_progress_bar_config(disable=True)
    gates = Path(spec) / eraser.ERASER_FILE
    if gates.is_file():
        eraser.install(pipe, eraser.load(gates))
    return pipe.to(device)


def model_family(pipe: DiffusionPipeline) -> Family:
    """Which Stable Diffusion family a pipeline belongs to, judged from its architecture."""
    unet_cfg = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_cfg.get("use_linear_projection"):
        return "sd2"
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        return "sd2"
    text = getattr(pipe, "text_encoder", None)
    if text is not None and text.config.hidden_size == 1024:  # OpenCLIP ViT-H
        return "sd2"
    return "sd1"


def model_info(pipe: DiffusionPipeline) -> ModelInfo:
    """Family, prediction type and sizes of a loaded pipeline."""
    unet_cfg = pipe.unet.config
    return ModelInfo(
        family=model_family(pipe),
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        cross_attention_dim=unet_cfg.cross_attention_dim,
        sample_size=unet_cfg.sample_size * pipe.vae_scale_factor,
        text_encoders=tuple(n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None),
    )


def fingerprint(pipe: DiffusionPipeline) -> str:
    """Hash of the UNet's and text encoders' weights, e.g. "sha256:0123456789abcdef".

    Values are hashed as float32, so fp16 and fp32 loads of the same fp16 file agree
    (fp16 -> fp32 is exact). The VAE is left out: no patch touches it. An installed
    eraser (fmn.model.eraser) is part of the model and of its fingerprint.
    """
    from fmn.model import eraser

    h = hashlib.sha256()
    for component in ("unet", *TEXT_ENCODERS):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        params = {_canonical_name(n): p for n, p in module.named_parameters()}
        for name in sorted(params):
            p = params[name]
            h.update(f"{component}.{name}:{tuple(p.shape)}\n".encode())
            values = p.detach().to(device="cpu", dtype=torch.float32).contiguous()
            h.update(values.numpy().data)  # the raw bytes, without a Python-level copy
    gates = eraser.installed_eraser(pipe)
    if gates is not None:
        for name, t in gates.tensors().items():
            h.update(f"eraser.{name}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().to(dtype=torch.float32).contiguous().numpy().data)
        h.update(repr([g.meta() for g in gates.gates]).encode())  # anchors and templates
    return "sha256:" + h.hexdigest()[:16]


def _canonical_name(name: str) -> str:
    # transformers >= 5.6 dropped the `text_model.` wrapper of CLIPTextModel; the same
    # weights must keep the same fingerprint across that change
    return name.removeprefix("text_model.")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide loading progress bars and the steps_offset deprecation notice we then fix."""
    bars = diffusers_logging.is_progress_bar_enabled()
    tf_bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*steps_offset", category=FutureWarning)
            # diffusers passes a huggingface_hub argument that is now deprecated; not ours to fix
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
            yield
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
        if tf_bars:
            transformers_logging.enable_progress_bar()


def _load(
    spec: str, *, dtype: torch.dtype, offline: bool, config: str | Path | None
) -> DiffusionPipeline:
    if spec.startswith(EMBEDDED_PREFIX):
        return _load_directory(_embedded_dir(spec), dtype=dtype)
    path = Path(spec).expanduser()
    refuse_pickle(path, ModelLoadError, "load")
    if path.is_dir():
        return _load_directory(path, dtype=dtype)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(
                f"{spec} is a file but not a .safetensors checkpoint; pass a .safetensors "
                "file, a diffusers pipeline directory, a hub id or embedded:tiny-world"
            )
        return _load_single_file(path, dtype=dtype, offline=offline, config=config)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _load_hub(spec, dtype=dtype, offline=offline)
    raise ModelNotFoundError(
        f"model path does not exist: {spec} (hint: give a diffusers pipeline folder, a "
        ".safetensors checkpoint, a hub id org/name or embedded:tiny-world)"
    )


def _embedded_dir(spec: str) -> Path:
    name = spec.removeprefix(EMBEDDED_PREFIX)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ModelLoadError(f"bad embedded model name in {spec!r}; try embedded:tiny-world")
    from fmn.world.concepts import WORLDS

    if name not in WORLDS:
        raise ModelNotFoundError(
            f"no embedded world {name!r} in {spec!r}; the worlds are: {', '.join(WORLDS)}"
        )
    path = embedded_path(name)
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"embedded model {spec!r} is not built: {path} has no model_index.json. "
            f"Build it with `fmn world build --world {name} --out build/{name} --ship` "
            "(`fmn world list` names the worlds)."
        )
    return path


def _pipeline_class(class_name: str | None, where: str) -> type[DiffusionPipeline]:
    if class_name not in SUPPORTED_CLASSES:
        raise ModelLoadError(
            f"{where} is a {class_name or 'unknown'} model; only Stable Diffusion 1.x/2.x "
            f"and SDXL text-to-image pipelines are supported ({', '.join(SUPPORTED_CLASSES)})"
        )
    return SUPPORTED_CLASSES[class_name]


def _read_class_name(directory: Path) -> str | None:
    index = directory / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{directory} is not a diffusers pipeline directory (no model_index.json); "
            "pass a pipeline directory, a .safetensors checkpoint or a hub id"
        )
    try:
        index_data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index} is not readable JSON ({e}); re-save the pipeline") from e
    if not isinstance(index_data, dict):
        raise ModelLoadError(f"{index} is not a diffusers model index (not a JSON object)")
    return index_data.get("_class_name")


def _from_pretrained_kwargs(cls: type[DiffusionPipeline], dtype: torch.dtype) -> dict:
    # use_safetensors: a directory whose weights are .bin pickles fails instead of unpickling
    # `dtype`: newer diffusers deprecate `torch_dtype`; an older one that ignores the
    # keyword is caught by _ensure_dtype
    kwargs: dict = {"dtype": dtype, "use_safetensors": True}
    if cls is StableDiffusionPipeline:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    return kwargs


def _shared_tokenizer(directory: Path) -> dict:
    """An embedded world ships without its own vocabulary: its tokenizer/ holds only
    tokenizer_config.json, and the vocab.json + merges.txt shared by all worlds lie in
    fmn.world.SHARED_TOKENIZER beside it. Other folders load their tokenizer as they are."""
    own = directory / "tokenizer"
    shared = directory.parent / fmn.world.SHARED_TOKENIZER
    if (own / "vocab.json").is_file() or not (shared / "vocab.json").is_file():
        return {}
    from fmn.world.tokenizer import load_tokenizer

    config = json.loads((own / "tokenizer_config.json").read_text())
    return {"tokenizer": load_tokenizer(shared, config["model_max_length"])}


def _seeded_text_encoder(directory: Path, dtype: torch.dtype) -> dict:
    """A world whose text encoder ships without its token table (crowd-world: only the
    rows its captions trained, the rest from a seed; fmn.world.token_rows) gets the table
    filled in. Other folders load their text encoder as it is."""
    from fmn.world import token_rows

    rows = directory / "text_encoder" / token_rows.ROWS_FILE
    if not rows.is_file():
        return {}
    from transformers import CLIPTextModel
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()  # the table is missing from the file by design
    try:
        text = CLIPTextModel.from_pretrained(directory / "text_encoder", torch_dtype=dtype)
    finally:
        tf_logging.set_verbosity(level)
    with torch.no_grad():
        text.get_input_embeddings().weight.copy_(token_rows.fill_table(rows))
    return {"text_encoder": text.eval()}


MIN_VOCAB = 1000  # a tokenizer built from missing vocab files has a handful of tokens


def _load_directory(directory: Path, *, dtype: torch.dtype) -> DiffusionPipeline:
    cls = _pipeline_class(_read_class_name(directory), str(directory))
    try:
        pipe = cls.from_pretrained(
            str(directory),
            local_files_only=True,
            **_from_pretrained_kwargs(cls, dtype),
            **_shared_tokenizer(directory),
            **_seeded_text_encoder(directory, dtype),
        )
    except (OSError, ValueError) as e:
        hint = ""
        if any(directory.glob("*/*.bin")) or any(directory.glob("*/*.ckpt")):
            hint = " Its weights look pickled (.bin): convert them to .safetensors first."
        raise ModelLoadError(f"could not load the pipeline in {directory}: {e}{hint}") from e
    # transformers builds a tokenizer of a few tokens, silently, from a folder that has
    # lost its vocab.json/merges.txt (e.g. a copied embedded world, whose vocabulary is
    # shared): every prompt would then encode to the same ids
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and len(tok) < MIN_VOCAB:
            raise ModelLoadError(
                f"the tokenizer in {directory / name} has {len(tok)} tokens: its vocab.json/"
                "merges.txt are missing. A copied embedded world shares its vocabulary from "
                f"fmn/world/assets/{fmn.world.SHARED_TOKENIZER}/: copy vocab.json and "
                f"merges.txt from there into {directory / name}/."
            )
    return pipe


def _load_hub(repo_id: str, *, dtype: torch.dtype, offline: bool) -> DiffusionPipeline:
    where = f"hub model {repo_id}"
    try:
        # read model_index.json first so an unsupported model is refused before a download
        index = DiffusionPipeline.load_config(repo_id, local_files_only=offline)
        cls = _pipeline_class(index.get("_class_name"), where)
        return cls.from_pretrained(
            repo_id, local_files_only=offline, **_from_pretrained_kwargs(cls, dtype)
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        if offline:
            why, undo = (
                ("HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
                if _hub_offline()
                else ("local_files_only=True", "pass local_files_only=False")
            )
            raise ModelLoadError(
                f"{repo_id!r} is neither a local path nor a hub model in the local cache, and "
                f"the hub is off ({why}). Download it on a machine with network "
                f"(`hf download {repo_id} --local-dir DIR`) and pass DIR, or {undo}."
            ) from e
        raise ModelLoadError(
            f"{repo_id!r} is not a local path and could not be loaded from the hub: {e}"
        ) from e


def _single_file_is_sdxl(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())  # noqa: SIM118


def _local_config_dir(config: str | Path | None) -> Path | None:
    """The local directory that `config` names, or None (no config, or a hub id)."""
    if config is None:
        return None
    if str(config).startswith(EMBEDDED_PREFIX):
        return _embedded_dir(str(config))
    path = Path(config).expanduser()
    return path if path.is_dir() else None


def _load_single_file(
    path: Path, *, dtype: torch.dtype, offline: bool, config: str | Path | None
) -> DiffusionPipeline:
    config_dir = _local_config_dir(config)
    if config_dir is None and offline:
        # diffusers would otherwise go to the hub for the configs, even when told not to
        given = f" ({config} is not a local directory)" if config is not None else ""
        raise ModelLoadError(
            f"{path} is a single-file checkpoint; offline, converting it needs the configs of "
            "a diffusers pipeline of the same architecture. Pass config=<a local diffusers "
            "pipeline directory> (for example the base model it was fine-tuned from, or "
            f"embedded:tiny-world){given}, or load it once with network."
        )
    if config_dir is not None:
        cls = _pipeline_class(_read_class_name(config_dir), str(config_dir))
    else:  # online: diffusers infers the architecture and fetches its configs
        cls = StableDiffusionXLPipeline if _single_file_is_sdxl(path) else StableDiffusionPipeline
    config_arg = str(config_dir or config) if config is not None else None
    kwargs = _from_pretrained_kwargs(cls, dtype)
    kwargs.pop("use_safetensors")  # the file itself is safetensors; nothing else is read
    try:
        return cls.from_single_file(
            str(path), config=config_arg, local_files_only=offline, **kwargs
        )
    except Exception as e:  # diffusers raises many types here; all mean "not this model"
        raise ModelLoadError(
            f"could not load {path} as a single-file {cls.__name__} checkpoint"
            f"{f' with config {config_arg}' if config_arg else ''}: {e}"
        ) from e


def _check_text_to_image(pipe: DiffusionPipeline, spec: str) -> None:
    in_channels = pipe.unet.config.in_channels
    if in_channels != pipe.vae.config.latent_channels:
        raise ModelLoadError(
            f"{spec} has a UNet with {in_channels} input channels: an inpainting or depth "
            "model, not a text-to-image one; pass the base text-to-image model instead"
        )


def _ensure_dtype(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Cast any component that still is not `dtype` (only needed on old diffusers)."""
    for module in pipe.components.values():
        if not isinstance(module, torch.nn.Module):
            continue
        first = next(module.parameters(), None)
        if first is not None and first.dtype != dtype:
            module.to(dtype)


def _fix_steps_offset(pipe: DiffusionPipeline) -> None:
    """Set steps_offset=1, as Stable Diffusion was trained; many old configs carry 0."""
    scheduler = pipe.scheduler
    accepts = "steps_offset" in inspect.signature(type(scheduler).__init__).parameters
    if accepts and scheduler.config.get("steps_offset") != 1:
        scheduler.register_to_config(steps_offset=1)
