"""Merge many concept patches into one model (`fmn merge`).

Two methods (docs/merge.md has the derivation and the measured trade-offs):

`sum`: the weighted sum of dense deltas. Exact for one concept; past a few concepts the
edits pile up on every prompt they share directions with.

`closed-form`: for every cross-attention key/value projection W0 ([out, D], reading text
states e in R^D) find the delta dW that solves

    min  sum_i w_i * sum_{e in T_i} a_e ||(dW - dW_i) e||^2        (each concept's own edit)
       + alpha     * sum_{e in P}   b_e ||dW e||^2                 (preserved + general prompts)
       + beta      * ||dW||_F^2                                     (stay near the base)

T_i are the text states of concept i's training prompts: the positions its patch was
trained on carry total weight 1, the rest of those prompts' positions total weight 1
(they map to whatever the patch does there, usually ~nothing). P is the preserve set:
every preserved concept of the manifest in its type's prompts, weighted like a target
(total 2), plus the generic anchor prompts of fmn.data.anchors and the empty prompt, which
together weigh as much as the targets (total 2 per target), so neither side is outvoted
as concepts are added; alpha (`merge.preserve_weight`) scales the whole set. The
normal equations give

    dW (sum_i w_i C_i + alpha C_P + beta' I) = sum_i w_i dW_i C_i,   C = sum_e a_e e e^T

C_i and C_P depend only on the text encoder, so one D x D matrix (plus one [out, D] sum
per layer) is accumulated concept by concept: time grows linearly with the number of
concepts and memory stays at one patch. beta' = beta * trace(lhs) / D keeps the ridge
unit-free. Parameters other than attn2 to_k/to_v (patches trained with params=attn2 or
unet) cannot be fused this way and fall back to the weighted sum; the result says which.

An optional erase term (`MergeConfig.erase_weight`, off by default) also maps each
concept's prompt states, from the concept on, to the base keys/values of the same prompt
with the concept replaced by an anchor ("a photo of bob" -> "a photo of a person"), the
closed-form editors' erasure (UCE, MACE); it is unit-free, see `_ClosedForm.add` and
docs/merge.md. `overshoot` pushes that target past the anchor, away from the concept
(ESD's negative guidance); `choose_anchors` picks anchors the base model does not draw as
targets (fmn.merge.anchor_check); `tune` merges at every TUNE_GRID point and keeps the one the
base model itself judges best (fmn.train.judge).

Nothing here reads the embedded world's labels or classifier: the preserve set is the
manifest's `preserve` list and plain-English anchors.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fmn.data.anchors import ERASE_ANCHORS, GENERIC_WORDS, anchor_prompts
from fmn.io import atomic_dir, write_json
from fmn.manifest import Merge, option_default, option_factory
from fmn.merge.anchor_check import choose_anchor
from fmn.model import eraser as gates
from fmn.model.attention import token_weights
from fmn.model.conditioning import (
    concept_prompts,
    concept_token_ids,
    encode_text,
    words_token_ids,
)
from fmn.model.load import fingerprint
from fmn.model.patch import (
    Patch,
    PatchError,
    apply_patch,
    export_lora,
    load_patch,
    not_lora,
    patch_hash,
    patch_header,
    revert_patch,
    save_patch,
)
from fmn.progress import Progress
from fmn.train.resteer import PARAM_PATTERNS, resteer_config_for

METHODS = ("sum", "closed-form")
ERASE_TO = ("anchor", "removed")
# tune's grid (preserve_weight, erase_weight, overshoot), fixed before any measurement:
# preserve 10 makes the patches' own term small (past it nothing changes, docs/merge.md);
# erase 1x-10x the preserve weight; overshoot 0, 0.5 and ESD's default 1
TUNE_GRID = [(10.0, g, o) for g in (10.0, 30.0, 100.0) for o in (0.0, 0.5, 1.0)]
_KV = re.compile(PARAM_PATTERNS["to_kv"])


class MergeError(ValueError):
    """Patches that cannot be merged; the message names the concept at fault."""


_option = functools.partial(option_default, Merge)


@dataclass(kw_only=True)
class MergeConfig:
    """Merge settings. Derived from the manifest's `merge:` section (fmn.manifest.Merge,
    which says why): the options' defaults and the reasons for them live there; only knobs
    that are no manifest option have their defaults here. Build one by keyword, or with
    `from_manifest`."""

    method: str = _option("method")  # closed-form | sum | joint (fmn.run.stages, not here)
    # concept id -> weight (default 1)
    weights: dict[str, float] = field(default_factory=option_factory(Merge, "weights"))
    # scale of the preserve set (module docstring)
    preserve_weight: float = _option("preserve_weight")
    ridge: float = _option("ridge")  # relative to the mean eigenvalue of the statistics
    # weight of the erase term (module docstring): 0 fuses the patches as they are; > 0
    # also maps each concept's prompt states, from the concept on, to the base model's
    # keys/values of the same prompt with the concept replaced by an anchor. Relative: at
    # 1 the erase error (as a share of the concept-to-anchor distance) counts as much as
    # the edit error (as a share of the patch's edit)
    erase_weight: float = _option("erase_weight")
    # anchor: the type's word (fmn.data.anchors.ERASE_ANCHORS) or `anchors[id]`; removed: the
    # prompt with the concept left out
    erase_to: str = _option("erase_to")
    # concept id -> anchor text
    anchors: dict[str, str] = field(default_factory=option_factory(Merge, "anchors"))
    # erase_to anchor: per type, pick the anchor among plain words whose images the base
    # model itself least attributes to a target (fmn.merge.anchor_check); `anchors` still win
    choose_anchors: bool = _option("choose_anchors")
    anchor_images: int = 8  # images per candidate word the base model judges
    # erase target pushed past the anchor, away from the concept: anchor + overshoot *
    # (anchor - concept), ESD's negative guidance (Gandikota et al. 2023) in key/value space
    overshoot: float = _option("overshoot")
    # closed-form: try TUNE_GRID and keep the point the base model itself judges best
    # (fmn.train.judge; needs a preserve list); the weights above are then ignored
    tune: bool = _option("tune")
    tune_images: int = 4  # images per concept the base model judges, per grid point

    @classmethod
    def from_manifest(cls, merge: Merge) -> MergeConfig:
        """From a manifest's `merge:` section (fmn.manifest.Merge): every option by name
        but `robust`, which is the gates' (fmn.merge.gates.fit's lock)."""
        return cls(**merge.model_dump(exclude={"robust"}))


@dataclass
class MergeResult:
    patch: Patch
    seconds: float
    # closed-form only: per concept, the share of its own edit (on its target rows) the
    # merged delta keeps (1 = all of it), and the relative change of the preserve set
    kept: dict[str, float] = field(default_factory=dict)
    preserve_drift: float = 0.0
    summed_keys: list[str] = field(default_factory=list)  # keys fused by the plain sum
    anchor_checks: list[dict] = field(default_factory=list)  # choose_anchors: every candidate
    tuning: list[dict] = field(default_factory=list)  # tune: every grid point, judged


PatchSource = Patch | Path | str


def _load(source: PatchSource) -> tuple[Patch, str]:
    if isinstance(source, Patch):
        return source, ""
    return load_patch(source), patch_hash(source)


def _check_patch(patch: Patch, base_fp: str | None, seen: set[str]) -> None:
    cid = patch.concept
    if cid in seen:
        raise MergeError(f"concept {cid!r} is given twice; merge each concept's patch once")
    if base_fp and patch.base_fingerprint and patch.base_fingerprint != base_fp:
        raise MergeError(
            f"patch {cid!r} was made on base {patch.base_fingerprint}, not on this base "
            f"({base_fp}); re-run its concept on this model"
        )
    for k, d in patch.deltas.items():
        if not torch.isfinite(d).all():
            raise MergeError(f"patch {cid!r}: {k} holds NaN/Inf; re-run that concept")


Phrasing = str | tuple[str, ...]  # a concept's text, or its words where it has several


def _concept_spec(patch: Patch) -> tuple[Phrasing, str, str]:
    """(text or words, type, positions) the patch was trained on, from its recorded config."""
    return _spec(patch.concept, patch.config)


def _spec(cid: str, config: dict) -> tuple[Phrasing, str, str]:
    c = config.get("concept") or {}
    if not c.get("text") or not c.get("type"):
        raise MergeError(
            f"patch {cid!r} does not record its concept text/type; closed-form "
            "merge needs them (re-create the patch with this version, or use method sum)"
        )
    positions = (config.get("resteer") or {}).get("positions", "concept")
    words = c.get("words") or [c["text"]]
    return (c["text"] if len(words) == 1 else tuple(words)), c["type"], positions


def _corrects(config: dict) -> bool:
    """A correction's patch (fmn.train.correct): its edit is kept, never erased."""
    return "correct" in config


def _words(text: Phrasing) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


def _row_weights(pipe, text: Phrasing, kind: str, positions: str):
    """Text states of the concept's prompts [R, D] and each row's weight: the trained
    positions share weight 1, the other positions of the same prompts share weight 1."""
    cond = encode_text(pipe, concept_prompts(text, kind))
    w = token_weights(cond.input_ids, words_token_ids(pipe.tokenizer, text), positions, cond.eos_id)
    on = w > 0
    a = torch.where(on, 1.0 / on.sum().clamp(min=1), 1.0 / (~on).sum().clamp(min=1))
    return cond.embeds.reshape(-1, cond.embeds.shape[-1]).double(), a.reshape(-1).double()


def _gram(rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (rows * a[:, None]).T @ rows


def erase_rows(
    pipe, text: Phrasing, kind: str, anchor: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of the concept's prompts, the text states from the concept's first token
    on (the causal encoder carries the concept into all of them), each paired with the
    state at the same place of the prompt with the concept replaced by `anchor` ("a photo
    of bob" -> "a photo of a person"), or left out when `anchor` is None or empty ("a photo
    of"): (states [R, D], target states [R, D], weights [R], total 1). The concept's tokens
    map to the anchor's last token; later positions keep their distance from it. A concept
    with several words: the prompts of each, all mapped to the same anchor."""
    src, dst = [], []
    for word in _words(text):
        _erase_pairs(pipe, word, kind, anchor, src, dst)
    if not src:
        raise MergeError(f"concept {text!r}: its tokens are in none of its prompts")
    c = torch.full((len(src),), 1.0 / len(src), dtype=torch.float64)
    return torch.stack(src).double(), torch.stack(dst).double(), c


def _erase_pairs(pipe, text: str, kind: str, anchor: str | None, src: list, dst: list) -> None:
    prompts = concept_prompts(text, kind)
    swapped = [" ".join(p.replace(text, f" {anchor or ''} ").split()) for p in prompts]
    cond, cond_r = encode_text(pipe, prompts), encode_text(pipe, swapped)
    cids = concept_token_ids(pipe.tokenizer, text)
    shift = len(concept_token_ids(pipe.tokenizer, anchor)) - 1 if anchor else -1
    for b, ids in enumerate(cond.input_ids.tolist()):
        hits = [i for i in range(len(ids) - len(cids) + 1) if ids[i : i + len(cids)] == cids]
        if not hits:
            continue
        h, last = hits[0], len(ids) - 1
        for p in range(h, len(ids)):
            # without an anchor, the concept's tokens map to what follows the prefix
            q = max(h + shift, h) if p < h + len(cids) else p - len(cids) + shift + 1
            src.append(cond.embeds[b, p])
            dst.append(cond_r.embeds[b, min(q, last)])


def preserve_rows(
    pipe, exclude: set[str], preserve: Sequence[tuple[str, str]], n_targets: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states [R, D] the merge must leave in place and their weights [R]: every
    preserved concept weighs what a target weighs (its prompts, as the targets'), and the
    generic anchors (fmn.data.anchors) together weigh one target per target, so neither side
    is outvoted as the number of concepts grows."""
    rows, weights = [], []
    for text, kind in preserve:
        r, a = _row_weights(pipe, text, kind, resteer_config_for(kind).positions)
        rows.append(r)
        weights.append(a)
    cond = encode_text(pipe, anchor_prompts(exclude))
    generic = cond.embeds.reshape(-1, cond.embeds.shape[-1]).double()
    rows.append(generic)
    weights.append(torch.full((len(generic),), 2.0 * max(n_targets, 1) / len(generic)))
    return torch.cat(rows), torch.cat(weights).double()


def merge_patches(
    pipe,
    patches: Iterable[PatchSource],
    cfg: MergeConfig | None = None,
    *,
    preserve: Sequence[tuple[str, str]] = (),
    progress: Progress | None = None,
) -> MergeResult:
    """Merge patches made on `pipe`'s base into one. `patches` are Patch objects or paths,
    loaded one at a time. preserve: (text, type) of concepts that must survive (they anchor
    the closed-form fit). `pipe` is only read (its text encoder and weights)."""
    cfg = cfg or MergeConfig()
    if cfg.method not in METHODS:
        raise MergeError(f"merge method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.erase_to not in ERASE_TO:
        raise MergeError(f"erase_to must be one of {ERASE_TO}, got {cfg.erase_to!r}")
    for cid, w in cfg.weights.items():
        if not math.isfinite(w) or w < 0:
            raise MergeError(f"merge weight of {cid!r} is {w}; use a finite number >= 0")
    tick = progress or (lambda *a: None)
    t0 = time.time()
    sources = list(patches)
    if not sources:
        raise MergeError("no patches to merge")
    base_fp = fingerprint(pipe)
    if cfg.tune and cfg.method == "closed-form":
        return _tuned(pipe, sources, cfg, preserve, tick)
    checks: list[dict] = []
    choose = cfg.choose_anchors and cfg.erase_to == "anchor"
    if cfg.method == "closed-form" and cfg.erase_weight > 0 and choose:
        cfg, checks = _chosen_anchors(pipe, sources, cfg, preserve, tick)
    unet = dict(pipe.unet.named_parameters())
    merger = _ClosedForm(pipe, unet, cfg) if cfg.method == "closed-form" else None
    total: dict[str, torch.Tensor] = {}  # plain weighted sum of every key
    seen: set[str] = set()
    records, texts = [], set()
    for k, src in enumerate(sources):
        patch, digest = _load(src)
        _check_patch(patch, base_fp, seen)
        seen.add(patch.concept)
        w = float(cfg.weights.get(patch.concept, 1.0))
        for name, d in patch.deltas.items():
            if name not in unet or unet[name].shape != d.shape:
                raise MergeError(
                    f"patch {patch.concept!r}: {name} does not fit this base's UNet; was it "
                    "made for another model?"
                )
            total[name] = total.get(name, 0) + w * d.double()
        if merger is not None:
            text, kind, positions = _concept_spec(patch)
            texts.update(_words(text))
            merger.add(patch, w, text, kind, positions)
        records.append({"id": patch.concept, "weight": w, "hash": digest, "method": patch.method})
        tick("merging", k + 1, len(sources))
        del patch  # memory stays at one patch (plus the running sums)
    for what, named in (("weights", cfg.weights), ("anchors", cfg.anchors)):
        unknown = sorted(set(named) - seen)
        if unknown:
            raise MergeError(
                f"merge {what} name {unknown}, which no patch forgets; merged: {sorted(seen)}"
            )
    result = MergeResult(patch=None, seconds=0.0, anchor_checks=checks)  # type: ignore[arg-type]
    deltas = {n: d.float() for n, d in total.items()}
    if merger is not None:
        prows = preserve_rows(pipe, texts, preserve, len(records))
        fused, result.kept, result.preserve_drift = merger.solve(*prows, cfg)
        result.summed_keys = sorted(set(deltas) - set(fused))
        deltas.update(fused)
    ids = [r["id"] for r in records]
    result.patch = Patch(
        concept=",".join(ids),
        method=f"merge:{cfg.method}",
        deltas={n: d for n, d in deltas.items() if d.abs().max() > 0},
        config={
            "merge": {
                "method": cfg.method,
                "weights": {r["id"]: r["weight"] for r in records},
                "preserve_weight": cfg.preserve_weight,
                "ridge": cfg.ridge,
                "erase_weight": cfg.erase_weight,
                "erase_to": cfg.erase_to,
                "anchors": dict(cfg.anchors),
                "choose_anchors": cfg.choose_anchors,
                "overshoot": cfg.overshoot,
                "preserve": [list(p) for p in preserve],
            }
        },
        base_fingerprint=base_fp,
        extra={
            "concepts": records,
            "kept": {k: round(v, 4) for k, v in result.kept.items()},
            "preserve_drift": round(result.preserve_drift, 6),
            "summed_keys": result.summed_keys,
            "anchor_checks": checks,
        },
    )
    result.seconds = time.time() - t0
    result.patch.extra["seconds"] = round(result.seconds, 3)
    return result


def _specs(sources: list[PatchSource]) -> list[tuple[str, Phrasing, str]]:
    """(concept id, text, type) of every patch that removes its concept (corrections are
    left out: they are neither erased nor judged as gone), from metadata only."""
    specs = []
    for src in sources:
        cid, config = (src.concept, src.config) if isinstance(src, Patch) else patch_header(src)
        if not _corrects(config):
            specs.append((cid, *_spec(cid, config)[:2]))
    return specs


def _tuned(pipe, sources, cfg: MergeConfig, preserve, tick: Progress) -> MergeResult:
    """Merge at every TUNE_GRID point and keep the one whose merged model the base model
    itself judges best (fmn.train.judge): the harmonic mean of the share of target images
    no longer drawn and the share of preserved images still drawn (relative to the base
    model's); the first (gentlest) point on ties. No detector is read."""
    from fmn.train.judge import self_judged

    targets = [(text, kind) for _, text, kind in _specs(sources)]
    kept = list(dict.fromkeys(p for p in preserve if p not in targets))
    if not kept:
        raise MergeError(
            "merge tune judges what the merge keeps by the preserved concepts; give a "
            "preserve list of concepts not being forgotten (manifest `preserve:` or "
            "--preserve id:type)"
        )
    t0, checks = time.time(), []
    if cfg.erase_to == "anchor" and cfg.choose_anchors:
        cfg, checks = _chosen_anchors(pipe, sources, cfg, preserve, tick)
    judge = targets + kept
    base = self_judged(pipe, None, judge, images=cfg.tune_images)
    base_s = sum(base[t].share for t, _ in kept) / len(kept)
    best, table = None, []
    for k, (a, g, o) in enumerate(TUNE_GRID):
        tick("tuning the merge", k, len(TUNE_GRID))
        point = replace(
            cfg, preserve_weight=a, erase_weight=g, overshoot=o, tune=False, choose_anchors=False
        )
        res = merge_patches(pipe, sources, point, preserve=preserve)
        got = self_judged(pipe, res.patch, judge, images=cfg.tune_images)
        acc_e = sum(got[t].share for t, _ in targets) / len(targets)
        acc_s = sum(got[t].share for t, _ in kept) / len(kept) / max(base_s, 1e-9)
        h = round(2 * (1 - acc_e) * acc_s / max((1 - acc_e) + acc_s, 1e-9), 6)
        # recorded, not used to choose: as a tie-break it went to the harshest point
        # (docs/merge.md); the gentlest of tied points is the one that keeps most
        sep = sum(got[t].margin for t, _ in kept) / len(kept) - sum(
            got[t].margin for t, _ in targets
        ) / len(targets)
        table.append(
            {"preserve_weight": a, "erase_weight": g, "overshoot": o, "self_acc_e": acc_e,
             "self_acc_s_ratio": round(acc_s, 4), "self_h": h, "self_separation": sep}
        )  # fmt: skip
        if best is None or h > best[0]:
            best = (h, k, res)
    _, pick, result = best  # type: ignore[misc]
    for k, row in enumerate(table):
        row["chosen"] = k == pick
    tick("tuning the merge", len(TUNE_GRID), len(TUNE_GRID))
    result.tuning, result.anchor_checks = table, checks
    result.patch.extra["tuning"], result.patch.extra["anchor_checks"] = table, checks
    result.patch.config["merge"]["tune"] = True
    result.seconds = time.time() - t0
    result.patch.extra["seconds"] = round(result.seconds, 3)
    return result


def _chosen_anchors(
    pipe, sources: list[PatchSource], cfg: MergeConfig, preserve, tick: Progress
) -> tuple[MergeConfig, list[dict]]:
    """cfg with an anchor for every concept `anchors` leaves open: per type, the plain
    word (the type's default first, then fmn.data.anchors.GENERIC_WORDS) whose images the base
    model least attributes to one of the targets (fmn.merge.anchor_check), and every check."""
    specs = _specs(sources)
    chosen, checks = {}, []
    kinds = sorted({k for _, _, k in specs})
    for i, kind in enumerate(kinds):
        targets = [w for _, t, k in specs if k == kind for w in _words(t)]
        others = [t for t, k in preserve if k == kind]
        words = [ERASE_ANCHORS[kind], *GENERIC_WORDS.get(kind, [])]
        best, found = choose_anchor(
            pipe, kind, targets, others, words, images=cfg.anchor_images,
            progress=lambda k, n, i=i: tick(f"choosing anchors ({kinds[i]})", k, n),
        )  # fmt: skip
        chosen[kind] = best
        checks += [{**c.as_record(), "chosen": c.anchor == best} for c in found]
    anchors = {cid: chosen[k] for cid, _, k in specs} | cfg.anchors
    return replace(cfg, anchors=anchors), checks


class _ClosedForm:
    """Running statistics of the closed-form fit (module docstring), one concept at a time."""

    def __init__(self, pipe, unet: dict[str, torch.nn.Parameter], cfg: MergeConfig) -> None:
        self.pipe, self.erase, self.cfg = pipe, cfg.erase_weight, cfg
        self.keys = [n for n in unet if _KV.search(n)]
        self.w0 = {n: unet[n].detach().double() for n in self.keys}
        self.lhs: dict[int, torch.Tensor] = {}  # D -> sum_i w_i C_i (one per text width)
        self.rhs: dict[str, torch.Tensor] = {}  # layer -> sum_i w_i dW_i C_i
        self.targets: list[tuple[str, torch.Tensor, torch.Tensor, dict]] = []

    def add(self, patch: Patch, w: float, text: Phrasing, kind: str, positions: str) -> None:
        rows, a = _row_weights(self.pipe, text, kind, positions)
        gram = _gram(rows, a)
        dim = gram.shape[0]
        self.lhs[dim] = self.lhs.get(dim, 0) + w * gram
        own = {}
        for n in self.keys:
            if self.w0[n].shape[1] != dim:
                continue
            d = patch.deltas.get(n)
            if d is not None:
                self.rhs[n] = self.rhs.get(n, 0) + w * d.double() @ gram
                own[n] = (d.double() @ rows.T).pow(2).mul(a).sum().item()
        if self.erase > 0 and not _corrects(patch.config):  # erasing would undo a correction
            anchor = None
            if self.cfg.erase_to == "anchor":
                anchor = self.cfg.anchors.get(patch.concept, ERASE_ANCHORS[kind])
            src, dst, c = erase_rows(self.pipe, text, kind, anchor)
            # unit-free like the edit term: the erase error counts relative to how far the
            # concept's keys/values are from its anchor's, the edit error relative to the
            # edit's size. In absolute terms an object word sits ~20x closer to "thing" than
            # its patch's edit is large (a world measure, docs/merge.md), so a plain weight
            # erased identities and styles and left objects where their patches put them
            gap = sum((self.w0[n] @ (dst - src).T).pow(2).mul(c).sum().item() for n in own)
            edit = sum(own.values())
            # a patch that changes nothing gives no scale: then the weight is taken as is
            g = w * self.erase * (edit / max(gap, 1e-30) if edit > 0 else 1.0)
            # past the anchor, away from the concept (ESD's negative guidance); the scale
            # above stays the distance to the anchor itself
            dst = dst + self.cfg.overshoot * (dst - src)
            self.lhs[dim] = self.lhs[dim] + g * _gram(src, c)
            cross = ((dst - src) * c[:, None]).T @ src  # sum_e c (e' - e) e^T
            for n in self.keys:
                if self.w0[n].shape[1] == dim:
                    self.rhs[n] = self.rhs.get(n, 0) + g * self.w0[n] @ cross
        # kept only: rows and weights to report how much of the edit survives
        self.targets.append((patch.concept, rows, a, {"deltas": patch.deltas, "own": own}))

    def solve(self, prows: torch.Tensor, pweights: torch.Tensor, cfg: MergeConfig):
        fused: dict[str, torch.Tensor] = {}
        solved: dict[int, torch.Tensor] = {}
        for dim, lhs in self.lhs.items():
            if prows.shape[1] == dim:
                lhs = lhs + cfg.preserve_weight * _gram(prows, pweights)
            eye = torch.eye(dim, dtype=lhs.dtype)
            solved[dim] = lhs + cfg.ridge * lhs.trace() / dim * eye
        for n in self.keys:
            dim = self.w0[n].shape[1]
            if n in self.rhs:
                # dW = rhs @ lhs^-1; lhs is symmetric positive definite thanks to the ridge
                fused[n] = torch.linalg.solve(solved[dim], self.rhs[n].T).T
        kept = {}
        for cid, rows, a, info in self.targets:
            num = den = 0.0
            for n, own in info["own"].items():
                d = info["deltas"][n].double()
                err = ((fused[n] - d) @ rows.T).pow(2).mul(a).sum().item()
                num, den = num + err, den + own
            kept[cid] = 1.0 - math.sqrt(num / den) if den > 0 else 1.0
        drift_num = sum((fused[n] @ prows.T).pow(2).mul(pweights).sum().item() for n in fused)
        drift_den = sum((self.w0[n] @ prows.T).pow(2).mul(pweights).sum().item() for n in fused)
        drift = math.sqrt(drift_num / drift_den) if drift_den > 0 else 0.0
        return {n: d.float() for n, d in fused.items()}, kept, drift


def concept_patches(folder: Path) -> list[Path]:
    """Every patch file under a folder (one `delta.safetensors` per concept folder)."""
    files = sorted(folder.glob("*/delta.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise PatchError(f"no patches (*/delta.safetensors) under {folder}")
    return files


def write_merged(
    pipe,
    result: MergeResult,
    out: Path,
    *,
    lora_rank: int | None = None,
    eraser: gates.Eraser | None = None,
) -> dict:
    """Write a merge's outputs into `out` (replaced whole, atomically): delta.safetensors
    (the merged patch; none when it changes no weight), lora.safetensors (diffusers/peft
    LoRA; full rank is exact; left out, with the reason in merge.json, when the patch
    changes biases or norms, which a LoRA cannot carry: `params: attn2` or `unet`, or
    when it changes nothing),
    eraser.safetensors (the gated concepts' gates, fmn.model.eraser; also in model/, where
    fmn.model.load.load_pipeline installs it), model/ (a diffusers pipeline with the patch
    applied) and merge.json (every concept, its patch hash and weight, how much of its edit
    the merge kept; gated concepts with their gates' radius; `patch_hash` is the delta
    file's, or the eraser file's when there is no delta). `pipe` comes back unchanged.
    Returns the merge.json record."""
    with atomic_dir(out) as tmp:
        if not result.patch.deltas:  # every concept gated: no delta file, no LoRA
            lora = {"skipped": "the patch changes no weight (every concept is gated)"}
        else:
            save_patch(result.patch, tmp)
            if bad := not_lora(result.patch):
                n = len(bad)
                lora = {"skipped": f"{n} changed parameters are no 2-D weights: {bad[0]}, ..."}
            else:
                done = export_lora(result.patch, tmp / "lora.safetensors", lora_rank)
                lora = {"rank": done["rank"], "relative_error": done["relative_error"]}
        apply_patch(pipe, result.patch)
        try:
            pipe.save_pretrained(tmp / "model", safe_serialization=True)
        finally:
            revert_patch(pipe, result.patch)
        concepts = list(result.patch.extra.get("concepts", []))
        if eraser is not None:
            gates.save(eraser, tmp / gates.ERASER_FILE)
            shutil.copyfile(tmp / gates.ERASER_FILE, tmp / "model" / gates.ERASER_FILE)
            digest = patch_hash(tmp / gates.ERASER_FILE)
            concepts += [
                {"id": g.id, "weight": 1.0, "hash": digest, "method": "gate"} for g in eraser.gates
            ]
        record = {
            "method": result.patch.method,
            "base_fingerprint": result.patch.base_fingerprint,
            "patch_hash": patch_hash(tmp if result.patch.deltas else tmp / gates.ERASER_FILE),
            "concepts": concepts,
            "gated": [
                {"id": g.id, "radius": g.radius, "nearest": g.nearest, "reason": g.reason()}
                for g in (eraser.gates if eraser else [])
            ],
            "robust": bool(eraser and eraser.lock),  # the gates read only the base vocabulary
            "kept": result.kept,
            "preserve_drift": result.preserve_drift,
            "summed_keys": result.summed_keys,
            "anchor_checks": result.anchor_checks,
            "tuning": result.tuning,
            "seconds": result.seconds,
            "lora": lora,
        }
        write_json(tmp / "merge.json", record)
    return record
