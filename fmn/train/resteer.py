"""Attention re-steering (Forget-Me-Not, arXiv 2303.17591).

Fine-tune the UNet's cross-attention so that the image stops attending to the concept's
tokens. Latents and text conditioning come cached from `fmn.data.prepare`, so a step runs only
the UNet. A preservation term keeps the key/value projections of generic anchor prompts
(and the manifest's preserved concepts) where the base model had them, which is what stops
the edit from spreading to every other concept. Returns dense deltas; the model given in
is left unchanged.

One loop (`resteer_loop`) and one loss (`resteer_loss`) serve every way of running it:
one concept (`resteer`), several concepts into one patch (`resteer_joint`), and several
concepts each into its own patch, sharing UNet passes (`fmn.train.resteer_batch`).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from diffusers import DDPMScheduler

from fmn.data.prepare import Prepared
from fmn.manifest import ResteerOptions, option_default, type_defaults, type_ladder
from fmn.model.attention import (
    AttentionStore,
    attention_loss,
    attention_mass,
    background_loss,
    capture_cross_attention,
    token_weights,
)
from fmn.model.conditioning import TextConditioning, words_token_ids

PARAM_PATTERNS = {
    "to_kv": r"attn2\.to_[kv]\.weight$",  # the small patch: keys/values of the text only
    "attn2": r"attn2\.",  # all of cross-attention (the original's only_optimize_ca)
    "unet": r".",  # the whole UNet (the original's default)
}
MEASURE_TIMESTEPS = (200, 500, 800)  # where attention is measured before and after


_option = functools.partial(option_default, ResteerOptions)


@dataclass(kw_only=True)
class ResteerConfig:
    """Re-steering settings. Derived from the manifest's `ResteerOptions` (fmn.manifest
    says why): the options' defaults and the reasons for them live there, the per-type
    ones in `fmn.manifest.type_defaults`; only knobs that are no manifest option have
    their defaults here. Build one by keyword, or with `from_options` / `resteer_config_for`
    for a concept type."""

    steps: int = _option("steps")
    lr: float = _option("lr")  # AdamW
    params: str = _option("params")  # to_kv | attn2 | unet, see PARAM_PATTERNS
    # concept | concept+eot | all_eot | concept+after, see attention.token_weights
    positions: str = type_defaults()["positions"]
    batch: int = _option("batch")  # images per step
    seed: int = _option("seed")
    # weight of the anchor key/value preservation term (preservation_loss)
    preserve_weight: float = type_defaults()["preserve_weight"]
    t_min: int = 0  # timestep range sampled during training
    t_max: int = 1000
    grad_clip: float = 1.0  # clipped in every mode (the original silently skipped it for the UNet)
    # with masks only: weight of the term that holds the cross-attention output OUTSIDE the
    # mask at the base model's (fmn.model.attention.background_loss), so the edit stays on the
    # concept's pixels; without masks there is no outside and it is unused
    background_weight: float = 0.0
    # the closed loop (fmn.train.loop): judge the patch, and re-steer at the next of `rungs`
    # (overrides of the fields above, gentlest first) while the concept is still drawn. It
    # runs where `loop` is on and there are rungs: resteer_config_for fills them from the
    # type's ladder (every manifest's and `fmn forget`'s config); a config built by hand
    # without rungs is one plain re-steer
    loop: bool = _option("loop")
    rungs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_options(cls, concept_type: str, options: ResteerOptions) -> ResteerConfig:
        """The config of a concept of `concept_type` with these options (a manifest's
        resolved `resteer`, or `fmn forget`'s): every option by name, the type's defaults
        where they are None. The mask is no re-steering setting: prepare applies it."""
        return resteer_config_for(concept_type, **options.model_dump(exclude={"mask"}))


def resteer_config_for(concept_type: str, **overrides: Any) -> ResteerConfig:
    """The ResteerConfig for a concept type: its type defaults (fmn.manifest.type_defaults),
    then explicit overrides (None values are ignored, so unset CLI/manifest options fall
    through)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = ResteerConfig(**{**type_defaults(concept_type), **given})
    if cfg.loop and "rungs" not in given:
        # positions or preserve_weight set by hand pin the loop to that one rung
        pinned = {"positions", "preserve_weight"} & set(given)
        cfg.rungs = [{}] if pinned else type_ladder(concept_type)
    return cfg


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
    """One step's random draw: (image indices, prompt indices, timesteps, noise)."""
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


def resteer_loss(
    store: AttentionStore,
    data: Prepared,
    cfg: ResteerConfig,
    idx_img: torch.Tensor,
    anchors: AnchorGram | None,
    weights: Callable[[], dict[str, torch.Tensor]],
    base: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The re-steering loss of one concept, on its samples of a UNet pass (`store`): the
    attention on its tokens, plus the background hold (with masks), plus the weighted
    preservation of `anchors` (None: no term). `weights()` gives the patch's trained
    weights as the model uses them; it is called only for the preservation term."""
    masks = data.masks[idx_img] if data.masks is not None else None
    loss = attention_loss(store, masks)
    if holds_background(data, cfg):
        loss = loss + cfg.background_weight * background_loss(store, masks)
    if anchors is not None:
        loss = loss + cfg.preserve_weight * preservation_loss(weights(), base, anchors)
    return loss


class Held(Protocol):
    """Where resteer_loop's patches live: InPlace (one patch in the UNet's own weights) or
    fmn.train.resteer_batch.KVDeltas (a patch per concept, added to keys/values per sample)."""

    params: list[dict[str, torch.nn.Parameter]]  # per patch, the tensors it trains
    base: dict[str, torch.Tensor]  # base weights, what the preservation term compares with
    hold_base: dict[int, dict[str, torch.Tensor]]  # the background hold's (AttentionStore.base)
    kv_delta: Callable | None  # CaptureProcessor.kv_delta; None when trained in place
    groups: list[tuple[int, int, int]]  # (concept, start, end) of each part of the pass

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        """Patch k's trained weights as the model uses them."""
        ...

    def deltas(self, k: int) -> dict[str, torch.Tensor]:
        """Patch k as trained minus base."""
        ...

    def restore(self) -> None:
        """Leave the UNet's weights as they came."""
        ...


def unet_pass(
    unet, sched: DDPMScheduler, parts: Sequence[tuple], held: Held | None = None
) -> list[tuple[int, int, int]]:
    """Run the UNet once over every part, (concept, data, image indices, prompt indices,
    timesteps, noise), concatenated; returns (concept, start, end) of each part, which
    `held` is given before the pass (its key/value deltas go to each part's samples)."""
    noisy, embeds, ts, kwargs, groups, start = [], [], [], [], [], 0
    for k, data, idx_img, idx_txt, t, noise in parts:
        noisy.append(sched.add_noise(data.latents[idx_img], noise, t))
        e, kw = data.cond.select(idx_txt)
        embeds.append(e)
        kwargs.append(kw)
        ts.append(t)
        groups.append((k, start, start + len(idx_img)))
        start += len(idx_img)
    if held is not None:
        held.groups = groups
    extra = {}
    if kwargs[0]:  # SDXL's pooled text and size ids
        extra["added_cond_kwargs"] = {
            key: torch.cat([kw["added_cond_kwargs"][key] for kw in kwargs])
            for key in kwargs[0]["added_cond_kwargs"]
        }
    unet(torch.cat(noisy), torch.cat(ts), encoder_hidden_states=torch.cat(embeds), **extra)
    return groups


def _unet_step(unet, sched, data: Prepared, idx_img, idx_txt, t, noise) -> None:
    """One concept's UNet pass (bench/masks_resteer.py measures with it)."""
    unet_pass(unet, sched, [(0, data, idx_img, idx_txt, t, noise)])


def measure_pairs(data: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, prompt) pairs attention is measured on: up to 8 images, each with one
    of the prompts in turn. Every prompt counts; the cost stays a fraction of training
    (every image with every prompt cost a third of a whole re-steering run at world size)."""
    idx_img = torch.arange(min(len(data.latents), 8))
    return idx_img, idx_img % len(data.cond.prompts)


@torch.no_grad()
def measure_attention(
    unet,
    sched: DDPMScheduler,
    datas: Sequence[Prepared],
    weights: Sequence[torch.Tensor],
    *,
    together: bool = False,
    held: Held | None = None,
) -> list[float]:
    """Each concept's mean attention mass on its tokens over its measure_pairs at a few
    fixed timesteps: the quantity re-steering drives down. together: all concepts in one
    UNet pass per timestep (else one pass each); held: key/value deltas to apply (see
    KVDeltas in fmn.train.resteer_batch). Each concept draws its own noise, so its value does
    not depend on the others."""
    gens = [torch.Generator().manual_seed(1234) for _ in datas]
    passes = [list(range(len(datas)))] if together else [[k] for k in range(len(datas))]
    masses: list[list[float]] = [[] for _ in datas]
    store = AttentionStore()
    with capture_cross_attention(unet, store, kv_delta=held.kv_delta if held else None):
        for t in MEASURE_TIMESTEPS:
            for ks in passes:
                parts = []
                for k in ks:
                    idx_img, idx_txt = measure_pairs(datas[k])
                    noise = torch.randn(datas[k].latents[idx_img].shape, generator=gens[k])
                    tt = torch.full((len(idx_img),), t)
                    parts.append((k, datas[k], idx_img, idx_txt, tt, noise))
                store.reset()
                store.token_weights = torch.cat([weights[p[0]][p[3]] for p in parts])
                for k, s, e in unet_pass(unet, sched, parts, held):
                    masses[k].append(attention_mass(store.slice(s, e)))
    return [sum(m) / len(m) for m in masses]


class InPlace:
    """One patch, trained in the UNet's own weights (any PARAM_PATTERNS selection): single
    and joint re-steering. `restore` puts the base weights back."""

    kv_delta = None  # the modules' own keys/values carry the edit: nothing to add

    def __init__(self, unet, which: str) -> None:
        self.params = [select_params(unet, which)]
        self.base = {n: p.detach().clone() for n, p in self.params[0].items()}
        # the modules' weights move: the hold compares with a copy of the base
        self.hold_base = base_by_module(unet, self.base)
        self.groups: list[tuple[int, int, int]] = []

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        return self.params[k]

    def deltas(self, k: int) -> dict[str, torch.Tensor]:
        return {n: (p.detach() - self.base[n]).clone() for n, p in self.params[k].items()}

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.params[0].items():
            p.copy_(self.base[n])


@dataclass
class Trained:
    """What resteer_loop returns: per patch its losses and deltas (zero ones left out), per
    concept its attention mass before and after."""

    losses: list[list[float]]
    deltas: list[dict[str, torch.Tensor]]
    before: list[float]
    after: list[float]


def resteer_loop(
    pipe,
    datas: Sequence[Prepared],
    cfgs: Sequence[ResteerConfig],
    anchors: Sequence[TextConditioning | None],
    held: Held,
    *,
    together: bool,
    progress: Callable[[int, int, float], None] | None = None,
) -> Trained:
    """The re-steering loop, for one concept or many.

    held: where the patches live. InPlace: one patch in the UNet's weights, shared by every
    concept (single and joint re-steering); fmn.train.resteer_batch.KVDeltas: a patch per
    concept. A patch takes its optimiser's lr and its random draws' seed from its first
    concept. together: every concept still owed steps shares each UNet pass (batched), else
    the concepts take turns, one pass each (joint). Either way each concept gets its own
    step count, token positions, masks, clipping and preservation weight, and the loss of a
    pass is the sum of its concepts' resteer_loss. anchors: per concept (None: no
    preservation term). The UNet's weights are left as they came."""
    unet = pipe.unet
    n = len(held.params)
    if n not in (1, len(datas)):
        raise ValueError("one patch for every concept, or one for all")
    slot = list(range(len(datas))) if n > 1 else [0] * len(datas)
    owner = [slot.index(s) for s in range(n)]  # each patch's first concept
    weights = [
        token_weights(
            d.cond.input_ids, words_token_ids(pipe.tokenizer, d.words), c.positions, d.cond.eos_id
        )
        for d, c in zip(datas, cfgs, strict=True)
    ]
    grams = _grams(anchors, cfgs)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's own noise schedule
    opts = [
        torch.optim.AdamW(p.values(), lr=cfgs[owner[s]].lr, weight_decay=0.0)
        for s, p in enumerate(held.params)
    ]
    gens = [torch.Generator().manual_seed(cfgs[owner[s]].seed) for s in range(n)]
    store = AttentionStore()
    store.latent_hw = tuple(datas[0].latents.shape[-2:])
    store.base = held.hold_base
    live = [
        [k for k, c in enumerate(cfgs) if s < c.steps] for s in range(max(c.steps for c in cfgs))
    ]
    plan = live if together else [[k] for ks in live for k in ks]
    total = sum(c.steps for c in cfgs)
    trained = [p for ps in held.params for p in ps.values()]
    was_training = unet.training
    unet.eval()  # no dropout: the loss must be deterministic given the seed
    unet.requires_grad_(False)
    losses: list[list[float]] = [[] for _ in range(n)]
    done = 0
    try:
        before = measure_attention(unet, sched, datas, weights, together=together)
        for p in trained:
            p.requires_grad_(True)
        with capture_cross_attention(unet, store, kv_delta=held.kv_delta):
            for step, ks in enumerate(plan):
                parts = [(k, datas[k], *draw_step(datas[k], cfgs[k], gens[slot[k]])) for k in ks]
                store.reset()
                store.token_weights = torch.cat([weights[p[0]][p[3]] for p in parts])
                store.hold = any(holds_background(datas[k], cfgs[k]) for k in ks)
                per = []
                for (k, s, e), part in zip(unet_pass(unet, sched, parts, held), parts, strict=True):
                    w = functools.partial(held.weights, slot[k])
                    loss = resteer_loss(
                        store.slice(s, e), datas[k], cfgs[k], part[2], grams[k], w, held.base
                    )
                    check_finite(loss, datas[k].concept_id, step)
                    per.append(loss)
                for opt in opts:
                    opt.zero_grad(set_to_none=True)  # a patch not in this pass has no grad
                torch.stack(per).sum().backward()
                for k, loss in zip(ks, per, strict=True):
                    clipped = list(held.params[slot[k]].values())
                    torch.nn.utils.clip_grad_norm_(clipped, cfgs[k].grad_clip)
                    opts[slot[k]].step()
                    losses[slot[k]].append(loss.item())
                done += len(ks)
                if progress:
                    progress(done, total, sum(x.item() for x in per))
        after = measure_attention(unet, sched, datas, weights, together=together, held=held)
        deltas = [held.deltas(s) for s in range(n)]
    finally:
        held.restore()  # leave the caller's model exactly as it came
        for p in trained:
            p.requires_grad_(False)
        unet.train(was_training)
    deltas = [{k: v for k, v in d.items() if v.abs().max() > 0} for d in deltas]
    return Trained(losses, deltas, before, after)


def _grams(
    anchors: Sequence[TextConditioning | None], cfgs: Sequence[ResteerConfig]
) -> list[AnchorGram | None]:
    """Each concept's preservation anchors as an AnchorGram (None: no term); one per
    distinct anchor set, since joint re-steering gives every concept the same."""
    made: dict[int, AnchorGram] = {}
    for a, c in zip(anchors, cfgs, strict=True):
        if a is not None and c.preserve_weight > 0 and id(a) not in made:
            made[id(a)] = AnchorGram(a.embeds.reshape(-1, a.embeds.shape[-1]))
    return [
        made[id(a)] if a is not None and c.preserve_weight > 0 else None
        for a, c in zip(anchors, cfgs, strict=True)
    ]


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
    for c in cfgs[1:]:  # they share one optimiser, one generator, one set of parameters
        if (c.params, c.lr, c.batch, c.seed) != (cfg.params, cfg.lr, cfg.batch, cfg.seed):
            raise ValueError("joint re-steering shares params, lr, batch and seed across concepts")
    held = InPlace(pipe.unet, cfg.params)
    run = resteer_loop(
        pipe, datas, cfgs, [anchors] * len(datas), held, together=False, progress=progress
    )
    config = asdict(cfg) if len(cfgs) == 1 else {"joint": [asdict(c) for c in cfgs]}
    return ResteerResult(
        ",".join(d.concept_id for d in datas),
        run.deltas[0],
        run.losses[0],
        sum(run.before) / len(run.before),
        sum(run.after) / len(run.after),
        time.time() - t0,
        config,
    )
