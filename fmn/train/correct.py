"""Correct a concept: train what its words draw towards a guide, instead of away from itself.

Forget-Me-Not's second extension (concept correction). A word that draws the wrong thing
(a role word that shows one person nine times in ten, a style drawn as another) is
re-steered towards a guide: a folder of images of what it should draw, or prompts the base
model draws them from (`guide: {prompts: [a photo of john, a photo of mary, ...]}`, in
turn, so every guide prompt is drawn equally often).

The objective is the diffusion model's own denoising loss, on the guide's images paired
with the concept's prompts, the way concept ablation (Kumari et al., "Ablating Concepts in
Text-to-Image Diffusion Models", ICCV 2023) pairs anchor images with the target prompt:

    L = E_{x ~ guide, p ~ concept prompts, t, eps} ||eps_theta(x_t, t, p) - eps||^2
        + preserve_weight * sum_layers ||dW A||^2 / ||W A||^2

Only the cross-attention keys and values of the text are trained (the patch the
closed-form merge fuses), and the second term, re-steering's preservation term
(fmn.train.resteer.preservation_loss), keeps the generic and preserved prompts' keys and
values at the base model's. A patch of method `correct` is applied, merged, audited and
reported like a removal's; only the merge's erase term leaves it out (it would undo the
correction). Nothing here reads the embedded world's labels or classifier.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from fmn.data.prepare import Prepared, prepare_resolved
from fmn.manifest import CorrectOptions, ResolvedConcept, option_default
from fmn.model.load import fingerprint
from fmn.model.patch import Patch
from fmn.progress import Progress
from fmn.train.forget import ForgetResult, concept_anchors, concept_record
from fmn.train.invert import noise_target
from fmn.train.resteer import (
    AnchorGram,
    InPlace,
    ResteerResult,
    check_finite,
    preservation_loss,
)

METHOD = "correct"
_option = functools.partial(option_default, CorrectOptions)


@dataclass(kw_only=True)
class CorrectConfig:
    """Correction settings, derived from the manifest's CorrectOptions (whose defaults and
    the reasons for them live there); `batch` and `grad_clip` are no manifest options."""

    steps: int = _option("steps")
    lr: float = _option("lr")
    preserve_weight: float = _option("preserve_weight")
    generate: int = _option("generate")
    seed: int = _option("seed")
    batch: int = 4  # images per step, as re-steering's
    grad_clip: float = 1.0

    @classmethod
    def from_options(cls, options: CorrectOptions) -> CorrectConfig:
        return cls(**options.model_dump())


def correct_prepared(
    pipe,
    data: Prepared,
    cfg: CorrectConfig,
    *,
    guide: dict,
    preserve: list[tuple[str, str]] | None = None,
    progress: Progress | None = None,
) -> ForgetResult:
    """Train the concept of `data` (its prompts, and the guide's images as its latents)
    towards the guide; its patch (method `correct`). `guide` is recorded as given
    ({"prompts": [...]} or {"images": folder}). `pipe` is left as it came."""
    tick = progress or (lambda *a: None)
    unet, t0 = pipe.unet, time.time()
    base = fingerprint(pipe)
    hw = data.images.shape[1:3] if data.images is not None else None
    anchors = concept_anchors(pipe, data, preserve or [], hw)
    gram = AnchorGram(anchors.embeds.reshape(-1, anchors.embeds.shape[-1]))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's own schedule
    held = InPlace(unet, "to_kv")
    params = held.params[0]
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    was_training = unet.training
    unet.eval()
    unet.requires_grad_(False)
    losses: list[float] = []
    try:
        for p in params.values():
            p.requires_grad_(True)
        for step in range(cfg.steps):
            idx_img = torch.randint(0, len(data.latents), (cfg.batch,), generator=gen)
            idx_txt = torch.randint(0, len(data.cond.prompts), (cfg.batch,), generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
            z0 = data.latents[idx_img].to(unet.device, unet.dtype)
            noise = torch.randn(z0.shape, generator=gen).to(z0)
            states, kwargs = data.cond.select(idx_txt)
            tt = t.to(unet.device)
            pred = unet(sched.add_noise(z0, noise, tt), tt, encoder_hidden_states=states, **kwargs)
            loss = (pred.sample - noise_target(sched, z0, noise, tt)).float().pow(2).mean()
            loss = loss + cfg.preserve_weight * preservation_loss(params, held.base, gram)
            check_finite(loss, data.concept_id, step)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            tick("correcting", step + 1, cfg.steps, {"loss": losses[-1]})
        deltas = held.deltas(0)
    finally:
        for p in params.values():
            p.requires_grad_(False)
        held.restore()
        unet.train(was_training)
    seconds = time.time() - t0
    result = ResteerResult(
        data.concept_id, deltas, losses, float("nan"), float("nan"), seconds, asdict(cfg)
    )
    patch = Patch(
        concept=data.concept_id,
        method=METHOD,
        deltas=deltas,
        config={
            "concept": concept_record(data),
            "correct": asdict(cfg),
            "guide": {k: str(v) if isinstance(v, Path) else v for k, v in guide.items()},
            "preserve": [list(p) for p in preserve or []],
        },
        base_fingerprint=base,
        extra={"seconds": seconds},
    )
    return ForgetResult(patch, result, None)


def guide_spec(r: ResolvedConcept) -> dict:
    """A resolved concept's guide as recorded: {"prompts": [...]} or {"images": folder},
    and the concepts it shows."""
    given = {"images": r.guide_images} if r.guide_images else {"prompts": list(r.guide_prompts)}
    return {**given, "concepts": list(r.guide_concepts)}


def correct_resolved(
    pipe,
    r: ResolvedConcept,
    data: Prepared | None = None,
    *,
    preserve: list[tuple[str, str]] | None = None,
    progress: Progress | None = None,
) -> ForgetResult:
    """Correct a manifest's (or `fmn forget --correct-to`'s) resolved concept. data: its
    prepared data (the run's stage reads it from the prep cache); None: prepared here
    (fmn.data.prepare.prepare_resolved: the guide's images with the concept's prompts)."""
    if data is None:
        data = prepare_resolved(pipe, r)
    cfg = CorrectConfig.from_options(r.correct)
    return correct_prepared(
        pipe, data, cfg, guide=guide_spec(r), preserve=preserve, progress=progress
    )
