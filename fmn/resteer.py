"""Attention re-steering of one concept (Forget-Me-Not, arXiv 2303.17591).

Fine-tune the UNet's cross-attention so that the image stops attending to the concept's
tokens. Latents and text conditioning come cached from `fmn.prepare`, so a step runs only
the UNet. A preservation term keeps the key/value projections of generic anchor prompts
(and the manifest's preserved concepts) where the base model had them, which is what stops
the edit from spreading to every other concept. Returns dense deltas; the model given in
is left unchanged.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDPMScheduler

from fmn.attention import (
    AttentionStore,
    attention_loss,
    attention_mass,
    background_loss,
    capture_cross_attention,
    token_weights,
)
from fmn.conditioning import TextConditioning
from fmn.prepare import Prepared

PARAM_PATTERNS = {
    "to_kv": r"attn2\.to_[kv]\.weight$",  # the small patch: keys/values of the text only
    "attn2": r"attn2\.",  # all of cross-attention (the original's only_optimize_ca)
    "unet": r".",  # the whole UNet (the original's default)
}


@dataclass
class ResteerConfig:
    steps: int = 35  # the original recipe's length
    # AdamW. With the preservation term below, 3e-3 is where an identity, an object and a
    # style of the embedded world fell to <= 20% of base with the rest kept (docs/resteer.md);
    # 1e-3 moved the object but not the identity, 1e-4 moved nothing in 35 steps
    lr: float = 3e-3
    params: str = "to_kv"  # to_kv | attn2 | unet, see PARAM_PATTERNS
    positions: str = "concept"  # concept | concept+eot | all_eot, see attention.token_weights
    batch: int = 4  # images per step
    seed: int = 0
    # weight of the anchor key/value preservation term: 0 lets the edit spread to every
    # neighbour (others' mean M-Score ratio 0.5-0.8 in the sweep), >= 1 stops the target
    # from moving at all at 35 steps; 0.3 sits between
    preserve_weight: float = 0.3
    t_min: int = 0  # timestep range sampled during training
    t_max: int = 1000
    grad_clip: float = 1.0  # clipped in every mode (the original silently skipped it for the UNet)
    # with masks only: weight of the term that holds the cross-attention output OUTSIDE the
    # mask at the base model's (fmn.attention.background_loss), so the edit stays on the
    # concept's pixels; without masks there is no outside and it is unused
    background_weight: float = 0.0


# Per-type defaults, measured on the embedded world (docs/resteer.md, 16 images per concept).
# The causal text encoder carries a word into every later position. A style word ends its
# prompts, so suppressing its own token leaves the style (outline 0.96 -> 0.90); adding
# every end-of-text/padding position works only with a strong preservation term that keeps
# the padding shared by other prompts in place (outline -> 0.08, others 1.01). An object is
# often followed by "in the style of ...": its own token alone took triangle only to 0.49;
# adding the first end-of-text token with preservation 1.0 took it to 0.13 (others 0.94).
# An identity goes with its own token and a light preservation term (carol -> 0.04).
TYPE_DEFAULTS: dict[str, dict] = {
    "object": {"positions": "concept+eot", "preserve_weight": 1.0},
    "style": {"positions": "all_eot", "preserve_weight": 10.0},
}


def resteer_config_for(concept_type: str, **overrides) -> ResteerConfig:
    """The ResteerConfig for a concept type: its type defaults, then explicit overrides
    (None values are ignored, so unset CLI/manifest options fall through)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return ResteerConfig(**{**TYPE_DEFAULTS.get(concept_type, {}), **given})


@dataclass
class ResteerResult:
    concept_id: str
    deltas: dict[str, torch.Tensor]  # UNet parameter name -> trained minus base
    losses: list[float]
    attention_before: float  # mean attention mass on the concept's tokens
    attention_after: float
    seconds: float
    config: dict = field(default_factory=dict)


class ResteerError(RuntimeError):
    """Re-steering of a concept failed (e.g. a NaN loss); the message names the concept."""


def select_params(unet, which: str) -> dict[str, torch.nn.Parameter]:
    if which not in PARAM_PATTERNS:
        raise ValueError(f"params must be one of {list(PARAM_PATTERNS)}, got {which!r}")
    pattern = re.compile(PARAM_PATTERNS[which])
    params = {n: p for n, p in unet.named_parameters() if pattern.search(n)}
    if not params:
        raise ValueError(f"no UNet parameter matches {which!r} ({PARAM_PATTERNS[which]})")
    return params


def concept_token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


class AnchorGram:
    """Anchor states [M, D] reduced to their Gram matrix G = sum_e e e^T ([D, D], summed in
    float64): sum ||dW e||^2 = trace(dW G dW^T), so a step of the preservation term costs
    O(out * D^2) per layer instead of O(M * out * D) (bench/resteer.py, docs/performance.md)."""

    def __init__(self, anchors: torch.Tensor) -> None:
        a = anchors.detach().double()
        self.gram = (a.T @ a).to(anchors.dtype)
        self.shape = anchors.shape


def preservation_loss(
    params: dict[str, torch.nn.Parameter],
    base: dict[str, torch.Tensor],
    anchors: torch.Tensor | AnchorGram,
) -> torch.Tensor:
    """Relative change of anchor keys/values: sum ||dW e||^2 / sum ||W e||^2, averaged over
    the trained to_k/to_v layers. anchors: [M, D] text-encoder states of anchor prompts, or
    their AnchorGram (the same value up to rounding, much cheaper)."""
    terms = []
    for n, p in params.items():
        if not re.search(PARAM_PATTERNS["to_kv"], n) or p.shape[1] != anchors.shape[1]:
            continue
        if isinstance(anchors, AnchorGram):
            g, d = anchors.gram, p - base[n]
            terms.append(((d @ g) * d).sum() / ((base[n] @ g) * base[n]).sum())
            continue
        ref = anchors @ base[n].T
        terms.append((anchors @ (p - base[n]).T).pow(2).sum() / ref.pow(2).sum())
    return torch.stack(terms).mean() if terms else torch.zeros(())


def holds_background(data: Prepared, cfg: ResteerConfig) -> bool:
    """Whether a step adds the background hold: it needs masks and a weight."""
    return cfg.background_weight > 0 and data.masks is not None


def base_by_module(unet, base: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """id(attn2 module) -> its base weights by local name, for the background hold."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for n, m in unet.named_modules():
        if n.endswith("attn2"):
            mine = {k[len(n) + 1 :]: v for k, v in base.items() if k.startswith(n + ".")}
            if mine:
                out[id(m)] = mine
    return out


def draw_step(data: Prepared, cfg: ResteerConfig, gen: torch.Generator) -> tuple:
    """One step's random draw: (image indices, prompt indices, timesteps, noise). Batched
    re-steering (fmn.resteer_batch) takes the same draws from each concept's generator."""
    idx_img = torch.randint(0, len(data.latents), (cfg.batch,), generator=gen)
    idx_txt = torch.randint(0, len(data.cond.prompts), (cfg.batch,), generator=gen)
    t = torch.randint(cfg.t_min, cfg.t_max, (cfg.batch,), generator=gen)
    noise = torch.randn(data.latents[idx_img].shape, generator=gen)
    return idx_img, idx_txt, t, noise


def check_finite(loss: torch.Tensor, concept_id: str, step: int) -> None:
    """Stop a diverging concept by name, before its NaN reaches the weights."""
    if not torch.isfinite(loss):
        raise ResteerError(
            f"concept {concept_id!r}: loss became {loss.item()} at step {step}; "
            "lower resteer.lr or the number of steps"
        )


def _unet_step(unet, sched, data: Prepared, idx_img, idx_txt, t, noise) -> None:
    noisy = sched.add_noise(data.latents[idx_img], noise, t)
    embeds, kwargs = data.cond.select(idx_txt)
    unet(noisy, t, encoder_hidden_states=embeds, **kwargs)


def measure_pairs(data: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, prompt) pairs attention is measured on: up to 8 images, each with one
    of the prompts in turn. Every prompt counts; the cost stays a fraction of training
    (every image with every prompt cost a third of a whole re-steering run at world size)."""
    idx_img = torch.arange(min(len(data.latents), 8))
    return idx_img, idx_img % len(data.cond.prompts)


@torch.no_grad()
def measure_attention(
    unet, sched: DDPMScheduler, data: Prepared, weights: torch.Tensor, seed: int = 1234
) -> float:
    """Mean attention mass on the concept's tokens over the measure_pairs at a few fixed
    timesteps: the quantity re-steering drives down."""
    gen = torch.Generator().manual_seed(seed)
    store = AttentionStore()
    store.latent_hw = tuple(data.latents.shape[-2:])
    idx_img, idx_txt = measure_pairs(data)
    masses = []
    with capture_cross_attention(unet, store):
        for t in (200, 500, 800):
            store.reset()
            store.token_weights = weights[idx_txt]
            noise = torch.randn(data.latents[idx_img].shape, generator=gen)
            _unet_step(unet, sched, data, idx_img, idx_txt, torch.full((len(idx_img),), t), noise)
            masses.append(attention_mass(store))
    return sum(masses) / len(masses)


def resteer(
    pipe,
    data: Prepared,
    cfg: ResteerConfig,
    *,
    anchors: TextConditioning | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> ResteerResult:
    """Re-steer one concept; returns its deltas and leaves `pipe` as it was."""
    return resteer_joint(pipe, [data], [cfg], anchors=anchors, progress=progress)


def resteer_joint(
    pipe,
    datas: Sequence[Prepared],
    cfgs: Sequence[ResteerConfig],
    *,
    anchors: TextConditioning | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> ResteerResult:
    """Re-steer several concepts in one run (the original's multi_concept), taking them in
    turn, one per step, each with its own token positions, masks and preservation weight;
    as many steps in all as the concepts would get alone. Returns one set of deltas and
    leaves `pipe` as it was. With one concept this is plain re-steering."""
    t0 = time.time()
    if not datas or len(datas) != len(cfgs):
        raise ValueError("one ResteerConfig per concept, and at least one concept")
    cfg = cfgs[0]
    for c in cfgs[1:]:
        if (c.params, c.lr, c.batch, c.seed) != (cfg.params, cfg.lr, cfg.batch, cfg.seed):
            raise ValueError("joint re-steering shares params, lr, batch and seed across concepts")
    unet = pipe.unet
    weights = [
        token_weights(
            d.cond.input_ids,
            concept_token_ids(pipe.tokenizer, d.text),
            c.positions,
            eos_id=d.cond.eos_id,
        )
        for d, c in zip(datas, cfgs, strict=True)
    ]
    params = select_params(unet, cfg.params)
    base = {n: p.detach().clone() for n, p in params.items()}
    anchor_states = None
    if anchors is not None and any(c.preserve_weight > 0 for c in cfgs):
        anchor_states = AnchorGram(anchors.embeds.reshape(-1, anchors.embeds.shape[-1]))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's own noise schedule
    before = _attention(unet, sched, datas, weights)

    was_training = unet.training
    unet.eval()  # no dropout: the loss must be deterministic given the seed
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    store = AttentionStore()
    store.latent_hw = tuple(datas[0].latents.shape[-2:])
    store.base = base_by_module(unet, base)
    losses: list[float] = []
    total = sum(c.steps for c in cfgs)
    # round-robin over the concepts still owed steps, so each gets exactly its own count
    longest = max(c.steps for c in cfgs)
    order = [k for s in range(longest) for k, c in enumerate(cfgs) if s < c.steps]
    try:
        with capture_cross_attention(unet, store):
            for step, k in enumerate(order):
                data, c = datas[k], cfgs[k]
                idx_img, idx_txt, t, noise = draw_step(data, c, gen)
                store.reset()
                store.token_weights = weights[k][idx_txt]
                store.hold = holds_background(data, c)
                _unet_step(unet, sched, data, idx_img, idx_txt, t, noise)
                masks = data.masks[idx_img] if data.masks is not None else None
                loss = attention_loss(store, masks)
                if store.hold:
                    loss = loss + c.background_weight * background_loss(store, masks)
                if anchor_states is not None and c.preserve_weight > 0:
                    loss = loss + c.preserve_weight * preservation_loss(params, base, anchor_states)
                check_finite(loss, data.concept_id, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), c.grad_clip)
                opt.step()
                losses.append(loss.item())
                if progress:
                    progress(step + 1, total, losses[-1])
        store.hold = False
        for p in params.values():
            p.requires_grad_(False)
        after = _attention(unet, sched, datas, weights)
        deltas = {n: (p.detach() - base[n]).clone() for n, p in params.items()}
    finally:
        with torch.no_grad():  # leave the caller's model exactly as it came
            for n, p in params.items():
                p.copy_(base[n])
                p.requires_grad_(False)
        unet.train(was_training)
    deltas = {n: d for n, d in deltas.items() if d.abs().max() > 0}
    config = asdict(cfg) if len(cfgs) == 1 else {"joint": [asdict(c) for c in cfgs]}
    return ResteerResult(
        ",".join(d.concept_id for d in datas),
        deltas,
        losses,
        before,
        after,
        time.time() - t0,
        config,
    )


def _attention(unet, sched, datas: Sequence[Prepared], weights: list[torch.Tensor]) -> float:
    """Mean over concepts of measure_attention."""
    vals = [measure_attention(unet, sched, d, w) for d, w in zip(datas, weights, strict=True)]
    return sum(vals) / len(vals)
