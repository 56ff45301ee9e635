"""The base model audits an edited model: does the edit still draw each concept?

The edited model draws a few images of every concept (its type's templates, fixed seeds);
the unedited base model then says which concept's prompt explains each image best (the
diffusion classifier of fmn.anchor_check), among the empty prompt and every concept of
the same type. A concept is still drawn in the share of its images attributed to it. It
needs no detector, so it can choose a merge's weights (fmn.merge, `tune`) on any
checkpoint; on the embedded world it tracks the world's detector (docs/merge.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from fmn.anchor_check import judge_images
from fmn.mscore.score import generate
from fmn.patch import Patch, apply_patch, revert_patch
from fmn.prepare import concept_prompts, encode_images


def self_judged(
    pipe,
    patch: Patch | None,
    concepts: Sequence[tuple[str, str]],
    *,
    images: int = 4,
    seed: int = 100,
) -> dict[str, float]:
    """concepts: (text, type). For each text, the share of the patched model's images of it
    that the base model attributes to it (1: still drawn, 0: gone). `pipe` comes back
    unpatched."""
    prompts, seeds, owner = [], [], []
    for text, kind in concepts:
        ps = concept_prompts(text, kind)
        for i in range(images):
            prompts.append(ps[i % len(ps)])
            seeds.append(seed + i)
            owner.append((text, kind))
    if patch is not None:
        apply_patch(pipe, patch)
    try:
        pixels = generate(pipe, prompts, seeds)
    finally:
        if patch is not None:
            revert_patch(pipe, patch)
    latents = encode_images(pipe, pixels)
    hits: dict[str, int] = {}
    for kind in dict.fromkeys(k for _, k in concepts):
        idx = [i for i, (_, k) in enumerate(owner) if k == kind]
        names = ["", *dict.fromkeys(t for t, k in concepts if k == kind)]
        per_name = [[""] * len(idx)]
        for text in names[1:]:
            ps = concept_prompts(text, kind)
            per_name.append([ps[(i % images) % len(ps)] for i in range(len(idx))])
        judged = judge_images(pipe, latents[idx], names, per_name, seed=seed)
        for i, name in zip(idx, judged, strict=True):
            hits[owner[i][0]] = hits.get(owner[i][0], 0) + (name == owner[i][0])
    return {text: hits.get(text, 0) / images for text, _ in concepts}
