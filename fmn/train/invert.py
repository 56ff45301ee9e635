"""Textual inversion (TI): learn n new token embeddings that make the base model draw a concept.

The re-steering prompts then name the concept with these tokens, which reach an identity or
a style that its plain name only weakly reaches. Only the new embedding rows are trained;
the UNet, the VAE and every existing token are frozen. Training is the ordinary denoising
loss (epsilon or v-prediction, as the base model was trained) on cached VAE latents.

The pipeline is left exactly as it was. The placeholder tokens live in copies of the
tokenizers, and the text encoders read the learned rows through a lookup that is swapped in
for their token embedding only while training. The caller gets the vectors and decides:
`save_ti` writes a file that diffusers' `load_textual_inversion` reads, and
`add_ti_to_pipeline` loads one into a pipeline through diffusers itself.

Multi-vector tokens follow diffusers: "<tok>", "<tok>_1", ..., "<tok>_{n-1}"; a prompt
written with "<tok>" alone is expanded to all of them by the pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fmn.io import atomic_path
from fmn.manifest import (
    InvertOptions,
    ResteerOptions,
    option_default,
    option_factory,
    refuse_pickle,
)
from fmn.model.conditioning import token_ids
from fmn.model.load import fingerprint, model_family

FORMAT = "fmn-ti"
FORMAT_VERSION = "1"
# Pipeline attribute of each text encoder -> its tokenizer, and its key in an SDXL TI file
# (the community convention that A1111, ComfyUI and diffusers' docs use).
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
# Prompts the tokens are learned in; varied so the tokens hold the concept, not one phrasing.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of {}",
        "a photo of the {}",
        "a close-up photo of {}",
        "a good photo of {}",
        "a rendering of {}",
        "a cropped photo of {}",
    ),
    "id": (
        "a photo of {}",
        "a portrait of {}",
        "a close-up photo of {}",
        "a picture of {}",
        "a photo of the face of {}",
    ),
    "style": (
        "a picture in the style of {}",
        "a painting in the style of {}",
        "an artwork in the style of {}",
        "a rendering in the style of {}",
    ),
    "nsfw": (
        "a photo of {}",
        "a picture of {}",
        "an image of {}",
    ),
}
# Start from a word of the right kind when no init_words are given: the tokens then begin
# near the region of embedding space the concept lives in.
GENERIC_WORDS = {"object": "object", "id": "person", "style": "style", "nsfw": "nude"}


class InversionError(RuntimeError):
    """Textual inversion failed (e.g. the loss diverged); the message names token and step."""


class TIFormatError(ValueError):
    """A TI file or tensor set that does not fit the format or the pipeline it is meant for."""


def _default_templates() -> dict[str, list[str]]:
    return {kind: list(prompts) for kind, prompts in TEMPLATES.items()}


_option = functools.partial(option_default, InvertOptions)


@dataclass(kw_only=True)
class InvertConfig:
    """Textual-inversion settings; the resolved config is saved inside every TI file.
    Derived from the manifest's `InvertOptions` (fmn.manifest says why): the options'
    defaults and the reasons for them live there; only knobs that are no manifest option
    have their defaults here. Build one by keyword, or with `from_options`."""

    tokens: int = _option("tokens")
    steps: int = _option("steps")
    lr: float = _option("lr")  # Adam, on the new embedding rows only
    batch: int = 4  # a few images per step steady the loss; memory grows with it
    # a manifest's concept learns its tokens with its re-steering seed (from_options)
    seed: int = option_default(ResteerOptions, "seed")
    # None: GENERIC_WORDS[type]
    init_words: list[str] | None = field(
        default_factory=option_factory(InvertOptions, "init_words")
    )
    templates: dict[str, list[str]] = field(default_factory=_default_templates)

    @classmethod
    def from_options(cls, options: InvertOptions, seed: int) -> InvertConfig:
        """The config of a concept with these options (a manifest's resolved `invert`, or
        `fmn forget`'s) and its re-steering `seed`: every option by name (`enabled` says
        whether to run it at all, which is the caller's to decide)."""
        return cls(**options.model_dump(exclude={"enabled"}), seed=seed)

    def __post_init__(self) -> None:
        for name in ("tokens", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"InvertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"InvertConfig.lr must be > 0, got {self.lr}")
        if self.init_words is not None and not any(w.strip() for w in self.init_words):
            raise ValueError("InvertConfig.init_words is empty; pass words or None")
        for kind, prompts in self.templates.items():
            bad = [p for p in prompts if p.count("{}") != 1]
            if not prompts or bad:
                raise ValueError(
                    f"InvertConfig.templates[{kind!r}] needs prompts with exactly one '{{}}' "
                    f"where the tokens go; got {bad or 'none'}"
                )


@dataclass
class TIResult:
    """Learned vectors, per text encoder ("text_encoder", "text_encoder_2"): [n, dim] each."""

    token: str
    vectors: dict[str, torch.Tensor]
    losses: list[float]
    config: InvertConfig
    family: str  # "sd1" | "sd2" | "sdxl": which file layout save_ti writes
    base_fingerprint: str  # of the pipeline the vectors were learned on


def placeholder_tokens(token: str, n: int) -> list[str]:
    """The n tokens diffusers' load_textual_inversion adds for a multi-vector `token`."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def invert(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    token: str,
    cfg: InvertConfig,
    concept_type: str = "object",
    progress: Callable[[int, int, float], None] | None = None,
    masks: torch.Tensor | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TIResult:
    """Learn `cfg.tokens` embeddings for `token` from a concept's images.

    `latents` are the images' VAE latents already multiplied by `vae.config.scaling_factor`,
    [N, 4, h, w]. `masks` ([N, h, w] in [0, 1], fmn.data.prepare's `Prepared.masks`) restrict
    the loss to the concept's pixels, so the tokens learn the concept and not what
    surrounds it in these images. The pipeline is not changed: nothing is added to its
    tokenizers or text encoders; load the result with `add_ti_to_pipeline` or save it with
    `save_ti`. `progress(step, steps, loss)` is called after every step.

    `project` (SD1/SD2: one text encoder) maps the vectors onto allowed ones, e.g. the
    nearest real token embeddings: every forward pass then uses the projected vectors and
    the gradient updates the unprojected ones (PEZ's straight-through step, Wen et al.
    2023), and the result holds the projected vectors.
    """
    family = model_family(pipe)
    if project is not None and family == "sdxl":
        raise InversionError("a projected inversion needs one text encoder (SD1/SD2), not SDXL")
    templates = _templates(cfg, concept_type)
    names = placeholder_tokens(_check_token(token), cfg.tokens)
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    latents = _check_latents(pipe, latents).to(device=device, dtype=dtype)
    if masks is not None:
        masks = _check_masks(masks, latents).to(device=device, dtype=torch.float32)
    noise_scheduler = training_scheduler(pipe)
    timesteps = noise_scheduler.config.num_train_timesteps
    encoders = {n: getattr(pipe, n) for n in TOKENIZERS if getattr(pipe, n, None) is not None}
    # a concept type of the caller's own templates starts from the broadest word
    init_words = cfg.init_words or [GENERIC_WORDS.get(concept_type, "object")]

    # Per text encoder: template token ids (tokenized once, here) and the trainable rows.
    ids, new_ids, vectors = {}, {}, {}
    for name, encoder in encoders.items():
        tokenizer = _placeholder_tokenizer(getattr(pipe, TOKENIZERS[name]), names)
        new_ids[name] = torch.tensor(tokenizer.convert_tokens_to_ids(names), device=device)
        ids[name] = _tokenize_templates(tokenizer, templates, names).to(device)
        start = _mean_embedding(tokenizer, encoder, init_words, name)
        vectors[name] = start.repeat(cfg.tokens, 1).to(device).requires_grad_()
    # weight_decay 0: decay pulls toward the zero vector, which is no word at all
    optimizer = torch.optim.AdamW(list(vectors.values()), lr=cfg.lr, weight_decay=0.0)
    time_ids = _sdxl_time_ids(pipe, latents) if family == "sdxl" else None
    gen = torch.Generator().manual_seed(cfg.seed)

    losses: list[float] = []
    with _frozen(unet, *encoders.values()), _learned_rows(encoders, new_ids, vectors):
        for step in range(1, cfg.steps + 1):
            pick, which, noise, t = _get_batch(latents, len(templates), cfg.batch, timesteps, gen)
            x0 = latents[pick]
            noisy = noise_scheduler.add_noise(x0, noise, t)
            target = noise_target(noise_scheduler, x0, noise, t)
            if project is not None:  # forward with the projection, gradient to the vectors
                for name, encoder in encoders.items():
                    v = vectors[name]
                    encoder.get_input_embeddings().vectors = v + (project(v) - v).detach()
            embeds, pooled = _encode(encoders, {n: i[which] for n, i in ids.items()})
            extra = {}
            if time_ids is not None:
                extra["added_cond_kwargs"] = {
                    "text_embeds": pooled,
                    "time_ids": time_ids.expand(len(x0), -1),
                }
            pred = unet(noisy, t, encoder_hidden_states=embeds.to(dtype), **extra).sample
            loss = _loss(pred.float(), target.float(), None if masks is None else masks[pick])
            if not torch.isfinite(loss):
                raise InversionError(
                    f"textual inversion of {token} diverged at step {step}/{cfg.steps}: loss "
                    f"is {loss.item()}; try a lower lr than {cfg.lr}, or float32 weights"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, cfg.steps, losses[-1])

    if not all(torch.isfinite(v).all() for v in vectors.values()):
        raise InversionError(
            f"textual inversion of {token} gave non-finite vectors at step {cfg.steps}"
        )
    if project is not None:
        vectors = {n: project(v.detach()) for n, v in vectors.items()}
    return TIResult(
        token=token,
        vectors={n: v.detach().to("cpu", torch.float32).clone() for n, v in vectors.items()},
        losses=losses,
        config=cfg,
        family=family,
        base_fingerprint=fingerprint(pipe),
    )


def _check_token(token: str) -> str:
    if not token or token != token.strip() or any(c.isspace() for c in token):
        raise ValueError(
            f"TI token must be one word without spaces, e.g. '<my-concept>'; got {token!r}"
        )
    return token


def _templates(cfg: InvertConfig, concept_type: str) -> list[str]:
    if concept_type not in cfg.templates:
        known = sorted(cfg.templates)
        raise ValueError(f"unknown concept type {concept_type!r}; expected one of {known}")
    return cfg.templates[concept_type]


def _check_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    channels = pipe.unet.config.in_channels
    if latents.ndim != 4 or latents.shape[0] < 1 or latents.shape[1] != channels:
        raise ValueError(
            f"latents must be [N, {channels}, h, w] VAE latents (already scaled by "
            f"vae.config.scaling_factor), got shape {tuple(latents.shape)}"
        )
    return latents


def training_scheduler(pipe: DiffusionPipeline) -> DDPMScheduler:
    """The training-time noise schedule: a DDPM scheduler with the base model's betas."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind!r} is not supported; epsilon or v_prediction")
    return scheduler


def noise_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """What the UNet predicts for x0 noised with `noise` at t: the noise, or the velocity."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def _check_masks(masks: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    want = (latents.shape[0], *latents.shape[-2:])
    if tuple(masks.shape) != want:
        raise ValueError(
            f"masks must be [N, h, w] = {list(want)}, one per latent at latent resolution "
            f"(fmn.data.prepare's Prepared.masks), got {list(masks.shape)}"
        )
    if not masks.sum() > 0:  # an empty mask would train nothing, silently
        raise ValueError(
            "every mask is empty (no pixel > 0): nothing of the concept would enter the "
            "loss; check the mask folder (white = concept) or use mask: none"
        )
    return masks


def _loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over every pixel, or over the masks' pixels (weighted by them): the
    same scale either way, so the learning rate means the same with and without masks."""
    if masks is None:
        return F.mse_loss(pred, target)
    w = masks[:, None].expand_as(pred)
    return ((pred - target).pow(2) * w).sum() / w.sum().clamp(min=1e-6)


def _placeholder_tokenizer(tokenizer, names: list[str]):
    """A copy of `tokenizer` that knows the placeholder tokens; the pipeline's stays as it is."""
    taken = [n for n in names if n in tokenizer.get_vocab()]
    if taken:
        raise ValueError(
            f"{taken} already in the pipeline's tokenizer (a TI is loaded under that name?); "
            "pick another token or unload it with pipe.unload_textual_inversion()"
        )
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(names)
    return tokenizer


def _tokenize_templates(tokenizer, templates: list[str], names: list[str]) -> torch.Tensor:
    """[len(templates), max_length] ids, padded and truncated the way the pipeline does."""
    prompts = [t.replace("{}", " ".join(names)) for t in templates]
    ids = token_ids(tokenizer, prompts)
    want = torch.tensor(tokenizer.convert_tokens_to_ids(names))
    for prompt, row in zip(prompts, ids, strict=True):
        if not torch.equal(row[torch.isin(row, want)], want):
            raise ValueError(
                f"the tokenizer does not keep the placeholder tokens in {prompt!r} "
                "as single tokens in order; pick a plain token such as '<my-concept>'"
            )
    return ids


def _mean_embedding(tokenizer, encoder: nn.Module, words: list[str], name: str) -> torch.Tensor:
    """Mean input embedding of the words' tokens: where the new rows start."""
    ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init_words {words} give no tokens in the {name} tokenizer")
    weight = encoder.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].detach().float().mean(0, keepdim=True)


def _sdxl_time_ids(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """SDXL's size conditioning as its pipeline builds it: original size, crop (0, 0), target."""
    h, w = (s * pipe.vae_scale_factor for s in latents.shape[-2:])
    return torch.tensor([[h, w, 0, 0, h, w]], device=latents.device, dtype=latents.dtype)


def _get_batch(
    latents: torch.Tensor, n_templates: int, batch: int, timesteps: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index, template index, noise, timestep) for `batch` samples. Images are drawn
    with replacement: a concept may have fewer images than a batch. Everything is drawn
    on the CPU, so a seed gives the same batches on any device."""
    pick = torch.randint(0, len(latents), (batch,), generator=gen)
    which = torch.randint(0, n_templates, (batch,), generator=gen)
    noise = torch.randn((batch, *latents.shape[1:]), generator=gen)
    t = torch.randint(0, timesteps, (batch,), generator=gen)
    device = latents.device
    return pick.to(device), which, noise.to(latents), t.to(device)


def _encode(
    encoders: dict[str, nn.Module], ids: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL's pooled ones) exactly as the pipelines' encode_prompt
    makes them without clip_skip: SD1/SD2 the final layer; SDXL the penultimate layer of
    both encoders side by side, and text_encoder_2's projected pooled output."""
    if "text_encoder_2" not in encoders:
        encoder = encoders["text_encoder"]
        return encoder(ids["text_encoder"])[0], None
    hidden, pooled = [], None
    for name, encoder in encoders.items():
        out = encoder(ids[name], output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: its text_embeds
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


class _LearnedRows(nn.Module):
    """Token embedding that reads the learned vectors for the placeholder ids."""

    def __init__(self, original: nn.Embedding, new_ids: torch.Tensor, vectors: torch.Tensor):
        super().__init__()
        self.original, self.new_ids, self.vectors = original, new_ids, vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids[..., None] == self.new_ids  # [B, L, n]
        # placeholder ids are past the original matrix; clamp so the lookup stays in range
        rows = self.original(input_ids.clamp(max=self.original.num_embeddings - 1))
        learned = is_new.to(self.vectors.dtype) @ self.vectors
        return torch.where(is_new.any(-1, keepdim=True), learned.to(rows.dtype), rows)


@contextlib.contextmanager
def _learned_rows(
    encoders: dict[str, nn.Module],
    new_ids: dict[str, torch.Tensor],
    vectors: dict[str, torch.Tensor],
) -> Iterator[None]:
    """Swap each encoder's token embedding for a `_LearnedRows` view; put it back on exit."""
    originals = {name: enc.get_input_embeddings() for name, enc in encoders.items()}
    try:
        for name, encoder in encoders.items():
            encoder.set_input_embeddings(
                _LearnedRows(originals[name], new_ids[name], vectors[name])
            )
        yield
    finally:
        for name, encoder in encoders.items():
            encoder.set_input_embeddings(originals[name])


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients, restoring each module's own flags on exit."""
    training = [m.training for m in modules]
    grads = [[p.requires_grad for p in m.parameters()] for m in modules]
    try:
        for m in modules:
            m.eval().requires_grad_(False)
        yield
    finally:
        for m, was_training, flags in zip(modules, training, grads, strict=True):
            m.train(was_training)
            for p, flag in zip(m.parameters(), flags, strict=True):
                p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------
# Files


def save_ti(result: TIResult, path: Path | str) -> Path:
    """Write `result` as a .safetensors TI file, atomically.

    SD1/SD2: one key, `{token: [n, dim]}`, which `pipe.load_textual_inversion(path)` loads.
    SDXL: keys "clip_l" and "clip_g", each loaded into its own encoder (see
    `add_ti_to_pipeline`). Metadata: format, token, n, family, base fingerprint, config.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"TI files are .safetensors; got {path}")
    tensors = _file_tensors(result)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "token": result.token,
        "n": str(result.config.tokens),
        "family": result.family,
        "base_fingerprint": result.base_fingerprint,
        "config": json.dumps(dataclasses.asdict(result.config)),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_ti(path: Path | str, pipe: DiffusionPipeline | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors TI file; with `pipe`, also checked to fit it (`check_ti`).

    Pickled embeddings (.pt, .bin, ...) are refused: unpickling runs arbitrary code.
    """
    path = Path(path)
    refuse_pickle(path, TIFormatError, "load")
    if path.suffix.lower() != ".safetensors":
        raise TIFormatError(f"{path} is not a .safetensors TI file")
    if not path.is_file():
        raise FileNotFoundError(f"TI file does not exist: {path}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise TIFormatError(
            f"{path} is truncated or not a safetensors file ({e}); re-create it, or copy it "
            "again if it came from elsewhere"
        ) from None
    if not tensors:
        raise TIFormatError(f"{path} holds no tensors: not a TI file")
    if pipe is not None:
        try:
            check_ti(pipe, tensors)
        except TIFormatError as e:
            raise TIFormatError(f"{path}: {e}") from None
    return tensors


def check_ti(pipe: DiffusionPipeline, tensors: dict[str, torch.Tensor]) -> None:
    """Raise TIFormatError unless `tensors` (a TI file's contents) fit `pipe`'s encoders."""
    family = model_family(pipe)
    if family == "sdxl":
        if set(tensors) != set(SDXL_KEYS.values()):
            raise TIFormatError(
                f"an SDXL pipeline needs a TI with keys 'clip_l' and 'clip_g' (one per text "
                f"encoder); this one has {sorted(tensors)}: an SD1/SD2 embedding?"
            )
        expected = {key: (name, tensors[key]) for name, key in SDXL_KEYS.items()}
    else:
        if len(tensors) != 1:
            raise TIFormatError(
                f"an {family} pipeline needs a TI with a single key (the token); this one has "
                f"{sorted(tensors)}{': an SDXL embedding?' if 'clip_l' in tensors else ''}"
            )
        expected = {key: ("text_encoder", t) for key, t in tensors.items()}
    for key, (name, tensor) in expected.items():
        dim = getattr(pipe, name).get_input_embeddings().weight.shape[-1]
        if tensor.ndim not in (1, 2) or tensor.shape[-1] != dim:
            raise TIFormatError(
                f"TI vectors {key!r} have shape {tuple(tensor.shape)}, dimension "
                f"{tensor.shape[-1]}, but this {family} pipeline's {name} expects dimension "
                f"{dim} ([n, {dim}]): the embedding was learned for another model"
            )


def add_ti_to_pipeline(
    pipe: DiffusionPipeline, result_or_path: TIResult | Path | str, token: str | None = None
) -> str:
    """Load a TI into `pipe` with diffusers' own `load_textual_inversion`; returns the token.

    `token` defaults to the learned one. Prompts then name the concept as "<token>"; the
    pipeline expands it to all n placeholder tokens.
    """
    path = None
    if isinstance(result_or_path, TIResult):
        tensors = _file_tensors(result_or_path)
        check_ti(pipe, tensors)
        token = token or result_or_path.token
    else:
        path = Path(result_or_path)
        tensors = load_ti(path, pipe)
        token = token or _file_token(path, tensors)
    if model_family(pipe) == "sdxl":
        for name, key in SDXL_KEYS.items():
            pipe.load_textual_inversion(
                tensors[key],
                token=token,
                text_encoder=getattr(pipe, name),
                tokenizer=getattr(pipe, TOKENIZERS[name]),
            )
    else:
        # a path goes through diffusers' file loading: proof that the file itself is
        # compatible; use_safetensors=True stops its fallback to unpickling
        source = str(path) if path is not None else tensors
        pipe.load_textual_inversion(
            source, token=token, use_safetensors=True, local_files_only=True
        )
    return token


def unload_ti(pipe: DiffusionPipeline, ti: TIResult) -> None:
    """Undo `add_ti_to_pipeline(pipe, ti)`: tokenizers and text encoders as before."""
    # every placeholder must be named: unloading "<t>" alone leaves "<t>_1" ... behind
    tokens = placeholder_tokens(ti.token, ti.config.tokens)
    if model_family(pipe) == "sdxl":
        pipe.unload_textual_inversion(tokens, pipe.tokenizer, pipe.text_encoder)
        pipe.unload_textual_inversion(tokens, pipe.tokenizer_2, pipe.text_encoder_2)
    else:
        pipe.unload_textual_inversion(tokens)


def _file_tensors(result: TIResult) -> dict[str, torch.Tensor]:
    if result.family == "sdxl":
        return {key: result.vectors[name].contiguous() for name, key in SDXL_KEYS.items()}
    return {result.token: result.vectors["text_encoder"].contiguous()}


def _file_token(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """The token a TI file was saved under: its single key, else its metadata."""
    if len(tensors) == 1:
        return next(iter(tensors))
    with safe_open(str(path), framework="pt") as f:
        token = (f.metadata() or {}).get("token")
    if not token:
        raise TIFormatError(f"{path} does not name its token; pass token=...")
    return token
