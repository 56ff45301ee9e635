"""Re-steer several concepts in one batched pass, each into its own patch.

At small and medium model sizes a re-steering step is dominated by fixed per-call costs
(hundreds of small kernels), not by arithmetic: a UNet pass over 12 samples costs little
more than over 4. Concepts are independent (separate deltas, separate losses), and the
frozen UNet has no batch-coupled layer (GroupNorm is per sample), so K concepts can share
each UNet pass: every sample's cross-attention adds its own concept's trained key/value
delta (KVDeltas, installed as fmn.model.attention.CaptureProcessor.kv_delta), and the summed
loss gives each concept exactly the gradient it would get alone. Each concept keeps its
own random draws (its own seed), learning rate, clipping, preservation term, masks and
step count, so the patches are those of `fmn.train.resteer.resteer` run one at a time, up to
float rounding (tests/test_resteer_batch.py). This is not joint re-steering: no concept's
edit sees another's. The loop is fmn.train.resteer.resteer_loop, run with `together=True`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F

from fmn.data.prepare import Prepared
from fmn.model.conditioning import TextConditioning
from fmn.train.resteer import ResteerConfig, ResteerResult, resteer_loop, select_params


class KVDeltas:
    """A patch per concept, trained as key/value deltas (float32) that each sample adds to
    the frozen UNet's own keys/values. Samples come grouped by concept: `groups` holds
    (concept, start, end) of the current pass (set by fmn.train.resteer.unet_pass)."""

    def __init__(self, unet, k: int) -> None:
        self.names = {
            id(m): (f"{n}.to_k.weight", f"{n}.to_v.weight")
            for n, m in unet.named_modules()
            if n.endswith("attn2")
        }
        self.base = {n: p.detach() for n, p in select_params(unet, "to_kv").items()}
        self.params = [
            {
                n: torch.nn.Parameter(torch.zeros_like(p, dtype=torch.float32))
                for n, p in self.base.items()
            }
            for _ in range(k)
        ]
        self.groups: list[tuple[int, int, int]] = []
        self.kv_delta = self._add
        # the modules keep their base weights: the background hold compares with them as
        # they are, and there is nothing to restore
        self.hold_base: dict[int, dict[str, torch.Tensor]] = {}

    def _add(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kname, vname = self.names[id(attn)]
        dk, dv = [], []
        for c, s, e in self.groups:
            ctx = context[s:e].float()
            dk.append(F.linear(ctx, self.params[c][kname]))
            dv.append(F.linear(ctx, self.params[c][vname]))
        return torch.cat(dk).to(context.dtype), torch.cat(dv).to(context.dtype)

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        return {n: self.base[n] + p for n, p in self.params[k].items()}

    def deltas(self, k: int) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(self.base[n].dtype) for n, p in self.params[k].items()}

    def restore(self) -> None:
        """Nothing to put back: the UNet's own weights never change."""


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
    held = KVDeltas(pipe.unet, len(datas))
    run = resteer_loop(pipe, datas, cfgs, anchors, held, together=True, progress=progress)
    seconds = (time.time() - t0) / len(datas)  # each concept's share of the shared passes
    return [
        ResteerResult(
            d.concept_id,
            run.deltas[k],
            run.losses[k],
            run.before[k],
            run.after[k],
            seconds,
            asdict(c),
        )
        for k, (d, c) in enumerate(zip(datas, cfgs, strict=True))
    ]
