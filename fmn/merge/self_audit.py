"""The base model audits an edited model: does the edit still draw each concept?

The edited model draws a few images of every concept (its type's templates, fixed seeds);
the unedited base model then says which concept's prompt explains each image best (the
diffusion classifier of fmn.merge.anchor_check), among the empty prompt and every concept of
the same type. A concept is still drawn in the share of its images attributed to it. It
needs no detector, so it can choose a merge's weights (fmn.merge.fuse, `tune`) on any
checkpoint; on the embedded world it tracks the world's detector (docs/merge.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fmn.merge.anchor_check import prompt_errors
from fmn.model.conditioning import cycled_prompts
from fmn.model.images import encode_images, generate
from fmn.model.patch import Patch, apply_patch, revert_patch


@dataclass
class Judged:
    share: float  # of the concept's images the base model attributes to it
    # mean over its images of (best other prompt's error - its own prompt's error): > 0
    # where its own prompt explains the images best, < 0 where another does
    margin: float


def self_judged(
    pipe,
    patch: Patch | None,
    concepts: Sequence[tuple[str, str]],
    *,
    images: int = 4,
    seed: int = 100,
) -> dict[str, Judged]:
    """concepts: (text, type). For each text, how far the base model still sees it in the
    patched model's images of it (share 1: still drawn, 0: gone). `pipe` comes back
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
