"""Forget one concept: prepare -> (textual inversion) -> re-steer -> patch.

The single-concept path behind `fmn forget`; the Prefect tasks call the same stages one by
one. Nothing here reads the embedded world's labels or classifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fmn.data.anchors import anchor_prompts
from fmn.data.prepare import Prepared, prepare_concept, prepare_resolved
from fmn.manifest import GENERATED_IMAGES, ResolvedConcept, ResteerOptions, option_default
from fmn.model.conditioning import concept_prompts, encode_text
from fmn.model.load import fingerprint
from fmn.model.patch import Patch
from fmn.progress import Progress
from fmn.train.invert import (
    InvertConfig,
    TIResult,
    add_ti_to_pipeline,
    invert,
    placeholder_tokens,
    unload_ti,
)
from fmn.train.loop import Loop, NotForgotten
from fmn.train.resteer import ResteerConfig, ResteerResult, resteer, resteer_joint
from fmn.train.resteer_batch import resteer_batch

# The manifest's default mask: a patch made here is the one `fmn run` makes.
DEFAULT_MASK: str = option_default(ResteerOptions, "mask")


@dataclass
class ForgetResult:
    patch: Patch
    resteer: ResteerResult
    ti: TIResult | None
    loop: dict | None = None  # the closed loop's record (fmn.train.loop.Loop.record)

    def log(self) -> dict:
        """What resteer.json says of the concept (`fmn forget` and the pipeline's stages):
        losses, time, attention on its tokens before and after, and the closed loop's
        record (how far it went and why it stopped; None without the loop)."""
        r = self.resteer
        return {
            "losses": r.losses,
            "seconds": r.seconds,
            # a correction (fmn.train.correct) does not measure attention: null
            "attention_before": None if math.isnan(r.attention_before) else r.attention_before,
            "attention_after": None if math.isnan(r.attention_after) else r.attention_after,
            "loop": self.loop,
        }


def concept_anchors(
    pipe, data: Prepared, preserve: list[tuple[str, str]], image_hw: tuple[int, int]
):
    """Anchor conditioning for a concept: the empty prompt, its own prompts without it,
    the manifest's preserved concepts and generic words (see fmn.data.anchors)."""
    context = [
        p.replace(w, "").strip() for w in data.words for p in concept_prompts(w, data.concept_type)
    ]
    prompts = anchor_prompts(
        set(data.words), context=list(dict.fromkeys(context)), preserve=preserve
    )
    return encode_text(pipe, prompts, image_hw=image_hw)


def concept_record(data: Prepared) -> dict:
    """The concept as a patch's config records it: id, type, text, and its words where it
    has several (a one-word concept's record is as it always was)."""
    out = {"id": data.concept_id, "type": data.concept_type, "text": data.text}
    return {**out, "words": list(data.words)} if len(data.words) > 1 else out


def _with_ti(pipe, data: Prepared, ti: TIResult) -> Prepared:
    """The concept's prompts re-encoded with its learned tokens instead of its text."""
    add_ti_to_pipeline(pipe, ti)
    tokens = " ".join(placeholder_tokens(ti.token, ti.config.tokens))
    hw = data.images.shape[1:3] if data.images is not None else None
    cond = encode_text(pipe, concept_prompts(ti.token, data.concept_type), image_hw=hw)
    return replace(data, text=tokens, words=(tokens,), cond=cond)


def forget_concept(
    pipe,
    concept_id: str,
    concept_type: str,
    text: str,
    resteer_cfg: ResteerConfig,
    *,
    invert_cfg: InvertConfig | None = None,
    images: np.ndarray | Path | None = None,
    generate: int = GENERATED_IMAGES,
    preserve: list[tuple[str, str]] | None = None,
    mask: str | Path = DEFAULT_MASK,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    words: list[str] | None = None,
) -> ForgetResult:
    """Forget one concept from `pipe`; returns its patch. `pipe` is left as it came.
    images: an array, a folder, or None to generate `generate` of them.
    words: every phrasing that reaches the concept (fmn.data.prepare.prepare_concept).
    mask: auto (the manifest's default, as everywhere) | face | attention | none | a
    folder of user masks (fmn.data.masks)."""
    data = prepare_concept(
        pipe,
        concept_id,
        concept_type,
        text,
        images=images,
        generate=generate,
        seed=resteer_cfg.seed,
        mask=mask,
        cache_dir=cache_dir,
        words=words,
    )
    return _forget_prepared(pipe, data, resteer_cfg, invert_cfg, preserve, mask, progress)


def forget_resolved(
    pipe,
    r: ResolvedConcept,
    *,
    preserve: list[tuple[str, str]] | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> ForgetResult:
    """forget_concept for a resolved concept (`fmn forget` resolves its options like a
    manifest's concept): the same preparation, configs and mask as `fmn run`'s stages
    (fmn.run.stages.concept), so both make the same patch. A concept with `action:
    correct` is fmn.train.correct.correct_resolved's. `pipe` is left as it came."""
    data = prepare_resolved(pipe, r, mask=r.mask, cache_dir=cache_dir)
    ti_cfg = InvertConfig.from_options(r.invert, r.resteer.seed) if r.invert.enabled else None
    cfg = ResteerConfig.from_options(r.type, r.resteer)
    return _forget_prepared(pipe, data, cfg, ti_cfg, preserve, r.mask, progress)


def _forget_prepared(
    pipe,
    data: Prepared,
    resteer_cfg: ResteerConfig,
    invert_cfg: InvertConfig | None,
    preserve: list[tuple[str, str]] | None,
    mask: str | Path,
    progress: Progress | None,
) -> ForgetResult:
    """Textual inversion (with `invert_cfg`), then re-steering, of a prepared concept."""
    ti = None
    if invert_cfg is not None:
        tick = progress or (lambda *a: None)
        ti = invert(
            pipe,
            data.latents,
            f"<{data.concept_id}>",
            invert_cfg,
            data.concept_type,
            progress=lambda d, t, loss: tick("inversion", d, t, {"loss": loss}),
            masks=data.masks,  # the tokens learn the concept's pixels, like re-steering
        )
    return resteer_prepared(
        pipe, data, resteer_cfg, ti=ti, preserve=preserve, mask=mask, progress=progress
    )


def resteer_prepared(
    pipe,
    data: Prepared,
    resteer_cfg: ResteerConfig,
    *,
    ti: TIResult | None = None,
    preserve: list[tuple[str, str]] | None = None,
    mask: str | Path = "none",
    progress: Progress | None = None,
) -> ForgetResult:
    """Re-steer a prepared concept (through its learned tokens when `ti` is given) and
    build its patch: the second half of forget_concept, and the pipeline's resteer stage
    (fmn.run.stages), which prepares and inverts in stages of their own. `mask` is only
    recorded here (prepare applied it). `pipe` is left as it came."""
    result = _patches(pipe, [data], [resteer_cfg], [ti], preserve, [mask], progress)[0]
    check_forgotten(result)
    return result


def check_forgotten(result: ForgetResult) -> ForgetResult:
    """The result, or NotForgotten (naming the concept and why) where the loop failed."""
    if result.loop is not None and result.loop["status"] == "failed":
        raise NotForgotten(f"concept {result.patch.concept!r}: {result.loop['reason']}", result)
    return result


def resteer_prepared_batch(
    pipe,
    datas: list[Prepared],
    cfgs: list[ResteerConfig],
    *,
    tis: list[TIResult | None] | None = None,
    preserve: list[tuple[str, str]] | None = None,
    masks: list[str | Path] | None = None,
    progress: Progress | None = None,
) -> list[ForgetResult]:
    """resteer_prepared for several concepts at once, sharing the UNet passes
    (fmn.train.resteer_batch): the same patches, in less time. `pipe` is left as it came."""
    tis = tis or [None] * len(datas)
    masks = masks or ["none"] * len(datas)
    return _patches(pipe, datas, cfgs, tis, preserve, masks, progress, together=True)


def _patches(
    pipe, datas, cfgs, tis, preserve, masks, progress, *, together: bool = False
) -> list[ForgetResult]:
    """Re-steer prepared concepts through their learned tokens (if any), one at a time or
    `together` (fmn.train.resteer_batch), and build their patches. A concept whose config
    has the loop on is judged after each rung (fmn.train.loop); those still drawn are
    re-steered at their next rung, together again. Its ForgetResult's `loop` says how it
    ended; resteer_prepared raises NotForgotten where it failed."""
    tick = progress or (lambda *a: None)

    def steering(done: int, total: int, loss: float) -> None:
        tick("re-steering", done, total, {"loss": loss})

    base = fingerprint(pipe)
    anchors = [concept_anchors(pipe, d, preserve or [], d.images.shape[1:3]) for d in datas]
    out: list[ForgetResult | None] = [None] * len(datas)
    loops = [Loop(c) if c.loop and c.rungs else None for c in cfgs]
    todo = list(range(len(datas)))
    while todo:
        now = [loops[k].config() if loops[k] else cfgs[k] for k in todo]
        results = _train(
            pipe,
            [datas[k] for k in todo],
            now,
            [tis[k] for k in todo],
            [anchors[k] for k in todo],
            together,
            steering,
        )
        for k, result in zip(todo, results, strict=True):
            out[k] = _result(datas[k], result, tis[k], preserve, masks[k], base)
            if loops[k] is not None:
                tick("judging", 0, 1, {})
                loops[k].judge(pipe, out[k], datas[k], preserve or [])
                out[k].loop = loops[k].record()
                out[k].patch.extra["loop"] = out[k].loop
                tick("judging", 1, 1, {})
        todo = [k for k in todo if loops[k] is not None and not loops[k].done]
    return out


def _train(pipe, datas, cfgs, tis, anchors, together, steering) -> list:
    """One round of re-steering: each concept through its learned tokens (if any)."""
    steered, loaded = [], []
    try:  # learned tokens stay loaded while training: their positions are found by id
        for data, ti in zip(datas, tis, strict=True):
            if ti is not None:
                loaded.append(ti)
            steered.append(_with_ti(pipe, data, ti) if ti is not None else data)
        if together:
            return resteer_batch(pipe, steered, cfgs, anchors=anchors, progress=steering)
        return [
            resteer(pipe, d, c, anchors=a, progress=steering)
            for d, c, a in zip(steered, cfgs, anchors, strict=True)
        ]
    finally:
        for ti in reversed(loaded):
            unload_ti(pipe, ti)


def _result(data, result, ti, preserve, mask, base) -> ForgetResult:
    """The patch of one re-steered concept (`data` as prepared, before any learned
    tokens), with how it was made."""
    patch = Patch(
        concept=data.concept_id,
        method="resteer+ti" if ti else "resteer",
        deltas=result.deltas,
        config={
            "concept": concept_record(data),
            "resteer": result.config,
            "invert": asdict(ti.config) if ti else None,
            "preserve": [list(p) for p in preserve or []],
            "mask": str(mask),
            "mask_record": data.record.get("masks") if data.record else None,
        },
        base_fingerprint=base,
        extra={
            "attention_before": result.attention_before,
            "attention_after": result.attention_after,
            "seconds": result.seconds,
        },
    )
    return ForgetResult(patch, result, ti)


def forget_joint(
    pipe,
    concepts: list[tuple[str, str, str | Sequence[str]]],
    cfgs: list[ResteerConfig],
    *,
    generate: int = GENERATED_IMAGES,
    preserve: list[tuple[str, str]] | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Patch:
    """Forget several concepts in one re-steering run (the original's multi_concept; the
    baseline of the merge benchmark, and `merge.method: joint` in a manifest).
    concepts: (id, type, text or the concept's words). Returns one patch over all of them."""
    tick = progress or (lambda *a: None)
    base = fingerprint(pipe)
    words = [[t] if isinstance(t, str) else list(t) for _, _, t in concepts]
    datas = [
        prepare_concept(
            pipe, cid, kind, w[0], generate=generate, seed=cfg.seed, cache_dir=cache_dir, words=w
        )
        for (cid, kind, _), w, cfg in zip(concepts, words, cfgs, strict=True)
    ]
    hw = datas[0].images.shape[1:3]
    # every concept's own anchors (its context words, the preserve list, generic words)
    anchors = [concept_anchors(pipe, d, preserve or [], hw) for d in datas]
    joint = replace(anchors[0], embeds=torch.cat([a.embeds for a in anchors]))
    result = resteer_joint(
        pipe,
        datas,
        cfgs,
        anchors=joint,
        progress=lambda d, t, loss: tick("joint re-steering", d, t, {"loss": loss}),
    )
    return Patch(
        concept=",".join(c[0] for c in concepts),
        method="resteer:joint",
        deltas=result.deltas,
        config={
            "concepts": [concept_record(d) for d in datas],
            "resteer": result.config,
            "preserve": [list(p) for p in preserve or []],
        },
        base_fingerprint=base,
        extra={"seconds": result.seconds},
    )
