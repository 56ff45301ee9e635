"""Cross-attention capture: a processor on `attn2` modules that exposes the attention the
image pays to chosen text tokens, a store that collects it, and the re-steering loss.

The fast SDPA path never materialises attention probabilities, so the capturing processor
computes them explicitly, and only on cross-attention; self-attention keeps its processor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

POSITION_MODES = ("concept", "concept+eot", "all_eot", "concept+after")


class AttentionStore:
    """Collects, per attn2 call, the attention columns of the weighted token positions.

    `token_weights` [B, T] selects the columns (1 at the concept's tokens); each call
    stores a [B, heads, Nq] map of attention mass on them. With no weights set, it only
    passes through. `latent_hw` lets a flat query length be mapped back to (h, w).
    """

    def __init__(self) -> None:
        self.token_weights: torch.Tensor | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.maps: list[torch.Tensor] = []
        # background hold (see background_loss): when set, each attn2 call also records,
        # per pixel, how far its output moved from the base model's for the same input.
        # base: id(attn module) -> its base weights by local name ("to_q.weight", ...),
        # for weights trained in place; with a kv_delta the keys/values before it are the base
        self.hold = False
        self.base: dict[int, dict[str, torch.Tensor]] = {}
        self.drift: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reset(self) -> None:
        self.maps = []
        self.drift = []

    def record(self, probs: torch.Tensor, heads: int) -> None:
        """probs: [B*heads, Nq, T] attention probabilities of one attn2 call."""
        if self.token_weights is None:
            return
        w = self.token_weights.to(device=probs.device, dtype=probs.dtype)
        cols = w.any(0).nonzero().flatten()  # only the columns some prompt selects
        bh, nq, t = probs.shape
        p = probs.view(bh // heads, heads, nq, t)[..., cols]
        if p.shape[0] != w.shape[0]:  # classifier-free guidance doubles the batch
            w = w.repeat(p.shape[0] // w.shape[0], 1)
        self.maps.append((p * w[:, None, None, cols]).sum(-1))

    def slice(self, start: int, end: int) -> AttentionStore:
        """What samples start:end of the batch recorded: one concept's part of a pass that
        several concepts share."""
        part = AttentionStore()
        part.latent_hw = self.latent_hw
        part.maps = [m[start:end] for m in self.maps]
        part.drift = [(a[start:end], b[start:end]) for a, b in self.drift]
        return part

    def layer_hw(self, nq: int) -> tuple[int, int]:
        h, w = self.latent_hw or (math.isqrt(nq),) * 2
        f = math.sqrt(h * w / nq)
        return round(h / f), round(w / f)


class CaptureProcessor:
    """diffusers' classic AttnProcessor with the probabilities handed to a store."""

    def __init__(self, store: AttentionStore) -> None:
        self.store = store
        # optional (attn, context) -> (key delta, value delta) added to the module's own
        # keys/values: lets each sample of a batch carry its own concept's trained delta
        # (fmn.train.resteer_batch.KVDeltas trains several concepts in one pass)
        self.kv_delta: Callable | None = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(
            attention_mask, context.shape[1], hidden_states.shape[0]
        )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        kv0 = (key.detach(), value.detach())  # the base's when a kv_delta carries the edit
        if self.kv_delta is not None:
            dk, dv = self.kv_delta(attn, context)
            key, value = key + dk, value + dv
        out = _heads(attn, query, key, value, attention_mask, self.store)
        if self.store.hold:
            with torch.no_grad():
                base = self.store.base.get(id(attn), {})
                ref = _base_out(attn, base, hidden_states, context, kv0, attention_mask)
            self.store.drift.append(_per_pixel(out, ref))
        hidden_states = attn.to_out[1](out)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _heads(attn, query, key, value, attention_mask, store: AttentionStore) -> torch.Tensor:
    """Multi-head attention followed by to_out[0]: [B, N, C]. Records probs in `store`."""
    query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
    probs = attn.get_attention_scores(query, key, attention_mask)
    store.record(probs, attn.heads)
    return attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value)))


def _base_out(attn, base: dict, hidden, context, kv0, attention_mask) -> torch.Tensor:
    """The module's output with its base weights (those in `base`; the others are as they
    are) for the same input: what the background hold compares against."""

    def lin(name: str, mod, x):
        w = base.get(f"{name}.weight", mod.weight)
        b = base.get(f"{name}.bias", mod.bias)
        return F.linear(x, w, b)

    q = lin("to_q", attn.to_q, hidden)
    k, v = kv0
    if "to_k.weight" in base:
        k, v = lin("to_k", attn.to_k, context), lin("to_v", attn.to_v, context)
    q, k, v = (attn.head_to_batch_dim(x) for x in (q, k, v))
    probs = attn.get_attention_scores(q, k, attention_mask)
    heads = attn.batch_to_head_dim(torch.bmm(probs, v))
    return lin("to_out.0", attn.to_out[0], heads)


def _per_pixel(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, N] squared distance to the reference, [B, N] squared norm of the reference)."""
    return (out - ref).pow(2).sum(-1), ref.pow(2).sum(-1)


def is_cross_attention(name: str) -> bool:
    """Names look like 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor'."""
    return ".attn2." in name


@contextmanager
def capture_cross_attention(
    unet, store: AttentionStore | None = None, kv_delta: Callable | None = None
) -> Iterator[AttentionStore]:
    """Install CaptureProcessor on every attn2 module; always restore the originals.
    kv_delta: see CaptureProcessor."""
    store = store or AttentionStore()
    originals = dict(unet.attn_processors)
    capture = CaptureProcessor(store)
    capture.kv_delta = kv_delta
    procs = {n: capture if is_cross_attention(n) else p for n, p in originals.items()}
    if not any(is_cross_attention(n) for n in procs):
        raise ValueError("this UNet has no cross-attention (attn2) modules to re-steer")
    # set_attn_processor empties the dict it is given: hand it copies
    unet.set_attn_processor(dict(procs))
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(originals))


def token_weights(
    input_ids: torch.Tensor,
    concept_ids: Sequence[int] | Sequence[Sequence[int]],
    mode: str = "concept",
    eos_id: int = 49407,
) -> torch.Tensor:
    """[B, T] weights, 1 at the positions that enter the loss.

    concept_ids: the concept's token ids, or one list per phrasing of a concept with
    several words (each prompt holds at least one of them).
    concept: the concept's own tokens (every occurrence of its id sequences).
    concept+eot: plus the first end-of-text token, which summarises the whole prompt.
    all_eot: plus every end-of-text position; with SD1.x tokenizers padding *is* end-of-text,
    so this puts padding shared by every prompt into the loss (the original's use_pooler).
    concept+after: the concept's tokens and every later position: the causal text encoder
    carries the concept into each of them ("a star in the style of dots": "dots" too).
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {mode!r}")
    ids = input_ids.tolist()
    alternatives = (
        [list(concept_ids)]
        if all(isinstance(t, int) for t in concept_ids)
        else [list(a) for a in concept_ids]
    )
    out = torch.zeros(input_ids.shape)
    for b, row in enumerate(ids):
        hits = [
            (i, len(a))
            for a in alternatives
            for i in range(len(row) - len(a) + 1)
            if row[i : i + len(a)] == a
        ]
        if not hits:
            raise ValueError(f"concept tokens {alternatives} not found in prompt ids {row}")
        hits.sort()
        for i, n in hits:
            out[b, i : i + n] = 1
        if mode == "concept+after":
            out[b, hits[0][0] :] = 1
        eots = [i for i, t in enumerate(row) if t == eos_id]
        if mode == "concept+eot" and eots:
            out[b, eots[0]] = 1
        elif mode == "all_eot":
            out[b, eots] = 1
    return out


def resize_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] masks in [0, 1] -> [B, h*w] at a cross-attention resolution (area average)."""
    return F.interpolate(masks[:, None].float(), size=hw, mode="area").flatten(1)


def attention_loss(store: AttentionStore, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Root-mean-square attention mass on the concept's tokens, over layers, heads and the
    pixels inside the mask (all pixels without one). Zero when the concept gets no attention."""
    if not store.maps:
        raise RuntimeError("no cross-attention was captured: was the UNet run inside capture?")
    losses = []
    for m in store.maps:
        b, heads, nq = m.shape
        if masks is None:
            losses.append(m.pow(2).mean())
            continue
        w = resize_masks(masks, store.layer_hw(nq)).to(m.dtype)
        w = w.repeat(b // w.shape[0], 1)[:, None, :]
        losses.append((m.pow(2) * w).sum() / (w.sum() * heads).clamp(min=1e-6))
    return torch.stack(losses).mean().sqrt()


def background_loss(store: AttentionStore, masks: torch.Tensor) -> torch.Tensor:
    """Relative change of the cross-attention output at the pixels OUTSIDE the mask, against
    the base model's output for the same input, averaged over layers:
    sum (1 - m) ||o - o_base||^2 / sum (1 - m) ||o_base||^2. It is what "re-steer only the
    concept's pixels" asks of the rest of the image: what it reads from the prompt stays."""
    if not store.drift:
        raise RuntimeError("no output drift was captured: set store.hold before the UNet pass")
    terms = []
    for moved, ref in store.drift:
        b, nq = moved.shape
        w = 1 - resize_masks(masks, store.layer_hw(nq)).to(moved.dtype)
        w = w.repeat(b // w.shape[0], 1)
        terms.append((moved * w).sum() / (ref * w).sum().clamp(min=1e-12))
    return torch.stack(terms).mean()


def attention_mass(store: AttentionStore) -> float:
    """Mean attention probability mass on the selected tokens, over layers, heads, pixels."""
    return float(torch.stack([m.mean() for m in store.maps]).mean())
