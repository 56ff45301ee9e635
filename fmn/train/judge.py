"""The base model judges images: which prompt explains an image best, and does a patched model
still draw each concept?

`prompt_errors` is the diffusion classifier of Li et al. (2023): the prompt whose noise
prediction errs least over fixed noise draws and timesteps explains an image best.
`self_judged` lets the unedited base model say, of a patched model's images of each concept,
how many it still attributes to that concept. Neither needs a detector, so both run on any
checkpoint: the closed re-steering loop (fmn.train.loop) judges its rungs with them, the
merge tuner (fmn.merge.fuse) its grid points, and the anchor check (fmn.merge.anchor_check)
the erase anchors. On the embedded worlds they track the world's detector (docs/merge.md,
docs/resteer.md). Nothing here reads the world's labels or classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fmn.model.conditioning import cycled_prompts, encode_text
from fmn.model.images import encode_images, generate
from fmn.model.patch import Patch, apply_patch, revert_patch
from fmn.train.invert import noise_target, training_scheduler


def judge_images(
    pipe, latents: torch.Tensor, names: Sequence[str], prompts: Sequence[Sequence[str]], **kw
) -> list[str]:
    """For each latent [N, C, h, w], the name whose prompt explains it best. prompts[j][i]
    is name j's prompt for image i (the template the image was drawn with)."""
    err = prompt_errors(pipe, latents, prompts, **kw)
    return [names[i] for i in err.argmin(1).tolist()]


@torch.no_grad()
def prompt_errors(
    pipe,
    latents: torch.Tensor,
    prompts: Sequence[Sequence[str]],
    *,
    timesteps: int = 8,
    draws: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """[N, P]: the base model's mean noise-prediction error on each latent under each
    prompt set (prompts[j][i] for image i), over fixed timesteps and noise draws."""
    sched, unet = training_scheduler(pipe), pipe.unet
    n = latents.shape[0]
    top = sched.config.num_train_timesteps
    ts = torch.linspace(top * 0.05, top * 0.95, timesteps).long().repeat(draws)
    gen = torch.Generator().manual_seed(seed)
    z0 = latents.to(unet.device, unet.dtype)
    noise = torch.randn((len(ts), *z0.shape), generator=gen).to(z0)
    err = torch.zeros(n, len(prompts))
    for j, texts in enumerate(prompts):
        cond = encode_text(pipe, list(texts))
        states, kwargs = cond.select(torch.arange(n))
        for k, t in enumerate(ts):
            tt = t.expand(n).to(unet.device)
            zt = sched.add_noise(z0, noise[k], tt)
            pred = unet(zt, tt, encoder_hidden_states=states, **kwargs).sample
            target = noise_target(sched, z0, noise[k], tt)
            err[:, j] += (pred - target).float().pow(2).mean(dim=(1, 2, 3)).cpu()
    return err / len(ts)


@dataclass
class Judged:
    share: float  # of the concept's images the base model attributes to it
    # mean over its images of (best other prompt's error - its own prompt's error): > 0
    # where its own prompt explains the images best, < 0 where another does
    margin: float


def self_judged(
    pipe,
    patch: Patch | None,
    concepts: Sequence[tuple[str | tuple[str, ...], str]],
    *,
    images: int = 4,
    seed: int = 100,
) -> dict[str | tuple[str, ...], Judged]:
    """concepts: (text, type); a text may be a tuple of a concept's phrasings, whose images
    and prompts cycle over them. For each text, how far the base model still sees it in
    the patched model's images of it (share 1: still drawn, 0: gone). `pipe` comes back
    unpatched."""
    prompts, seeds, owner = [], [], []
    for text, kind in concepts:
        prompts += cycled_prompts(text, kind, images)
        seeds += [seed + i for i in range(images)]
        owner += [(text, kind)] * images
    if patch is not None:
        apply_patch(pipe, patch)
    try:
        pixels = generate(pipe, prompts, seeds)
    finally:
        if patch is not None:
            revert_patch(pipe, patch)
    latents = encode_images(pipe, pixels)
    hits: dict[str, list[float]] = {}
    margins: dict[str, list[float]] = {}
    for kind in dict.fromkeys(k for _, k in concepts):
        idx = [i for i, (_, k) in enumerate(owner) if k == kind]
        names = ["", *dict.fromkeys(t for t, k in concepts if k == kind)]
        # each concept's images come in one block, templates in turn: so do the prompts
        blocks = len(idx) // images
        per_name = [[""] * len(idx)]
        per_name += [cycled_prompts(text, kind, images) * blocks for text in names[1:]]
        err = prompt_errors(pipe, latents[idx], per_name, seed=seed)
        for row, i in enumerate(idx):
            own = names.index(owner[i][0])
            others = torch.cat([err[row, :own], err[row, own + 1 :]])
            hits.setdefault(owner[i][0], []).append(float(err[row].argmin() == own))
            margins.setdefault(owner[i][0], []).append(float(others.min() - err[row, own]))
    return {
        t: Judged(sum(hits[t]) / len(hits[t]), sum(margins[t]) / len(margins[t]))
        for t, _ in concepts
    }
