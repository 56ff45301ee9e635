"""Re-steer several concepts in one batched pass, each into its own patch.

At small and medium model sizes a re-steering step is dominated by fixed per-call costs
(hundreds of small kernels), not by arithmetic: a UNet pass over 12 samples costs little
more than over 4. Concepts are independent (separate deltas, separate losses), and the
frozen UNet has no batch-coupled layer (GroupNorm is per sample), so K concepts can share
each UNet pass: every sample's cross-attention adds its own concept's trained key/value
delta (fmn.attention.CaptureProcessor.kv_delta), and the summed loss gives each concept
exactly the gradient it would get alone. Each concept keeps its own random draws (its own
seed), learning rate, clipping, preservation term, masks and step count, so the patches
are those of `fmn.resteer.resteer` run one at a time, up to float rounding
(tests/test_resteer_batch.py). This is not joint re-steering: no concept's edit sees
another's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from fmn.attention import (
    AttentionStore,
    attention_loss,
    background_loss,
    capture_cross_attention,
    token_weights,
)
from fmn.conditioning import TextConditioning
from fmn.prepare import Prepared
from fmn.resteer import (
    AnchorGram,
    ResteerConfig,
    ResteerResult,
    check_finite,
    concept_token_ids,
    draw_step,
    holds_background,
    measure_pairs,
    preservation_loss,
    select_params,
)

MEASURE_TIMESTEPS = (200, 500, 800)  # as fmn.resteer.measure_attention


class _Deltas:
    """Per-concept trainable key/value deltas and the hook that applies them: samples
    come grouped by concept, `groups` holds (concept, start, end) of the current batch."""

    def __init__(self, unet, k: int) -> None:
        self.names = {
            id(m): (f"{n}.to_k.weight", f"{n}.to_v.weight")
            for n, m in unet.named_modules()
            if n.endswith("attn2")
        }
        base = select_params(unet, "to_kv")
        self.params = [
            {
                n: torch.nn.Parameter(torch.zeros_like(p, dtype=torch.float32))
                for n, p in base.items()
            }
            for _ in range(k)
        ]
        self.groups: list[tuple[int, int, int]] = []
        self.active = True

    def __call__(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.active:  # measuring the base model
            zero = context.new_zeros(())
            return zero, zero
        kname, vname = self.names[id(attn)]
        dk, dv = [], []
        for c, s, e in self.groups:
            ctx = context[s:e].float()
            dk.append(F.linear(ctx, self.params[c][kname]))
            dv.append(F.linear(ctx, self.params[c][vname]))
        return torch.cat(dk).to(context.dtype), torch.cat(dv).to(context.dtype)


def _sub_store(store: AttentionStore, s: int, e: int) -> AttentionStore:
    sub = AttentionStore()
    sub.latent_hw = store.latent_hw
    sub.maps = [m[s:e] for m in store.maps]
    sub.drift = [(a[s:e], b[s:e]) for a, b in store.drift]
    return sub


def _run(unet, sched, deltas: _Deltas, batch: list[tuple], store: AttentionStore) -> None:
    """One UNet pass over (concept, data, idx_img, idx_txt, t, noise, token weights) parts."""
    noisy, embeds, ts, tws, groups, kwargs, start = [], [], [], [], [], [], 0
    for c, data, idx_img, idx_txt, t, noise, tw in batch:
        noisy.append(sched.add_noise(data.latents[idx_img], noise, t))
        e, kw = data.cond.select(idx_txt)
        embeds.append(e)
        kwargs.append(kw)
        ts.append(t)
        tws.append(tw)
        groups.append((c, start, start + len(idx_img)))
        start += len(idx_img)
    deltas.groups = groups
    store.reset()
    store.token_weights = torch.cat(tws)
    extra = {}
    if kwargs[0]:  # SDXL's pooled text and size ids
        extra["added_cond_kwargs"] = {
            key: torch.cat([kw["added_cond_kwargs"][key] for kw in kwargs])
            for key in kwargs[0]["added_cond_kwargs"]
        }
    unet(torch.cat(noisy), torch.cat(ts), encoder_hidden_states=torch.cat(embeds), **extra)


@torch.no_grad()
def _measure(unet, sched, datas, weights, deltas: _Deltas, store) -> list[float]:
    """fmn.resteer.measure_attention for every concept at once (same draws, same value)."""
    gens = [torch.Generator().manual_seed(1234) for _ in datas]
    masses: list[list[float]] = [[] for _ in datas]
    for t in MEASURE_TIMESTEPS:
        batch = []
        for c, data in enumerate(datas):
            idx_img, idx_txt = measure_pairs(data)
            noise = torch.randn(data.latents[idx_img].shape, generator=gens[c])
            tt = torch.full((len(idx_img),), t)
            batch.append((c, data, idx_img, idx_txt, tt, noise, weights[c][idx_txt]))
        _run(unet, sched, deltas, batch, store)
        for c, s, e in deltas.groups:
            masses[c].append(float(torch.stack([m[s:e].mean() for m in store.maps]).mean()))
    return [sum(m) / len(m) for m in masses]


def resteer_batch(
    pipe,
    datas: Sequence[Prepared],
    cfgs: Sequence[ResteerConfig],
    *,
    anchors: Sequence[TextConditioning | None],
    progress: Callable[[int, int, float], None] | None = None,
) -> list[ResteerResult]:
    """Re-steer each concept into its own deltas, sharing UNet passes. Same results as
    `resteer(pipe, datas[k], cfgs[k], anchors=anchors[k])` for each k; `pipe` is left
    unchanged. Only params 'to_kv' (the default) can be batched."""
    t0 = time.time()
    if not datas or not len(datas) == len(cfgs) == len(anchors):
        raise ValueError("one ResteerConfig and one anchor set per concept, at least one concept")
    bad = [d.concept_id for d, c in zip(datas, cfgs, strict=True) if c.params != "to_kv"]
    if bad:
        raise ValueError(f"batched re-steering trains to_k/to_v only; re-steer {bad} one by one")
    unet = pipe.unet
    weights = [
        token_weights(
            d.cond.input_ids, concept_token_ids(pipe.tokenizer, d.text), c.positions, d.cond.eos_id
        )
        for d, c in zip(datas, cfgs, strict=True)
    ]
    base = {n: p.detach() for n, p in select_params(unet, "to_kv").items()}
    grams = [
        AnchorGram(a.embeds.reshape(-1, a.embeds.shape[-1]))
        if a is not None and c.preserve_weight > 0
        else None
        for a, c in zip(anchors, cfgs, strict=True)
    ]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    deltas = _Deltas(unet, len(datas))
    store = AttentionStore()
    store.latent_hw = tuple(datas[0].latents.shape[-2:])
    was_training = unet.training
    unet.eval()
    unet.requires_grad_(False)
    try:
        with capture_cross_attention(unet, store, kv_delta=deltas):
            deltas.active = False
            before = _measure(unet, sched, datas, weights, deltas, store)
            deltas.active = True
            losses = _train(unet, sched, datas, cfgs, weights, grams, base, deltas, store, progress)
            with torch.no_grad():
                after = _measure(unet, sched, datas, weights, deltas, store)
    finally:
        unet.train(was_training)
    seconds = (time.time() - t0) / len(datas)  # each concept's share of the shared passes
    results = []
    for c, (data, cfg) in enumerate(zip(datas, cfgs, strict=True)):
        d = {n: p.detach().to(base[n].dtype) for n, p in deltas.params[c].items()}
        d = {n: v for n, v in d.items() if v.abs().max() > 0}
        results.append(
            ResteerResult(data.concept_id, d, losses[c], before[c], after[c], seconds, asdict(cfg))
        )
    return results


def _train(unet, sched, datas, cfgs, weights, grams, base, deltas, store, progress):
    """The optimisation: per concept its own AdamW, draws, clipping and step count."""
    opts = [
        torch.optim.AdamW(p.values(), lr=c.lr, weight_decay=0.0)
        for p, c in zip(deltas.params, cfgs, strict=True)
    ]
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    losses: list[list[float]] = [[] for _ in datas]
    longest = max(c.steps for c in cfgs)
    total = sum(c.steps for c in cfgs)
    done = 0
    store.hold = any(holds_background(d, c) for d, c in zip(datas, cfgs, strict=True))
    for step in range(longest):
        live = [k for k, c in enumerate(cfgs) if step < c.steps]
        batch = []
        for k in live:
            idx_img, idx_txt, t, noise = draw_step(datas[k], cfgs[k], gens[k])
            batch.append((k, datas[k], idx_img, idx_txt, t, noise, weights[k][idx_txt]))
        _run(unet, sched, deltas, batch, store)
        per: list[torch.Tensor] = []
        for (k, s, e), part in zip(deltas.groups, batch, strict=True):
            masks = datas[k].masks[part[2]] if datas[k].masks is not None else None
            sub = _sub_store(store, s, e)
            loss = attention_loss(sub, masks)
            if holds_background(datas[k], cfgs[k]):
                loss = loss + cfgs[k].background_weight * background_loss(sub, masks)
            if grams[k] is not None:
                shifted = {n: base[n] + p for n, p in deltas.params[k].items()}
                loss = loss + cfgs[k].preserve_weight * preservation_loss(shifted, base, grams[k])
            check_finite(loss, datas[k].concept_id, step)
            per.append(loss)
        for opt in opts:
            opt.zero_grad(set_to_none=True)  # a finished concept has no grad: AdamW skips it
        torch.stack(per).sum().backward()
        for k, loss in zip(live, per, strict=True):
            torch.nn.utils.clip_grad_norm_(list(deltas.params[k].values()), cfgs[k].grad_clip)
            opts[k].step()
            losses[k].append(loss.item())
        done += len(live)
        if progress:
            progress(done, total, sum(x.item() for x in per))
    store.hold = False
    return losses
