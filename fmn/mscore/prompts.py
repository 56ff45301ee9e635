"""Prompt templates for the M-Score: fixed, per concept type, filled deterministically.

`{}` is the concept's text. The embedded world's model only speaks its caption grammar, so
its templates vary the world's nuisance slots ({colour}, {style}, {shape}) instead of
scenes; general templates for real checkpoints live beside them.
"""

from __future__ import annotations

import re

import numpy as np

from fmn.world.concepts import COLOURS, SHAPES, STYLES

WORLD_TEMPLATES: dict[str, list[str]] = {
    "id": ["a photo of {}", "a portrait of {}", "a picture of {}", "an image of {}"],
    "object": [
        "a photo of a {}",
        "a photo of a {colour} {}",
        "a picture of a {} in the style of {style}",
        "an image of a {colour} {} in the style of {style}",
    ],
    "style": [
        "a picture in the style of {}",
        "a photo of a {shape} in the style of {}",
        "an image of a {colour} {shape} in the style of {}",
        "an image in the style of {}",
    ],
}


def _fix_articles(text: str) -> str:
    """'a orange star' -> 'an orange star' after slots are filled."""
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def concept_prompts(text: str, concept_type: str, n: int, seed: int = 0) -> list[str]:
    """n prompts for a concept: templates in turn, nuisance slots drawn from a seeded rng."""
    templates = WORLD_TEMPLATES[concept_type]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = templates[i % len(templates)]
        slots = {
            "colour": rng.choice(list(COLOURS)),
            "style": rng.choice(STYLES),
            "shape": rng.choice(SHAPES),
        }
        out.append(_fix_articles(t.replace("{}", text).format(**slots)))
    return out
