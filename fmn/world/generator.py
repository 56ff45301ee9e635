"""World samples: image + caption + ground-truth labels + object mask, deterministic by seed.

The labels and masks are the world's ground truth: they train the world's own model and
classifier and they measure; the forgetting side never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmn.world.concepts import COLOURS, HEADS, IDENTITIES, SHAPES, STYLES
from fmn.world.render import render_face, render_object

IMAGE_SIZE = 32  # pixels; the autoencoder maps it to 8x8x4 latents
ID_FRACTION = 0.3  # share of portraits among training images
PREFIXES = ["a photo", "a picture", "an image"]
NONE = -1  # label of a head that does not apply (e.g. the shape of a portrait)


@dataclass
class Sample:
    image: np.ndarray  # uint8, H x W x 3
    mask: np.ndarray  # float32, H x W, 1 where the concept (object or face) is
    caption: str
    labels: dict[str, int]  # head -> class index, or NONE


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_caption(shape: str | None, style: str | None, colour: str | None, prefix: str) -> str:
    """'a photo of a red star in the style of dots'; colour or style left out when None.
    Without a shape it reads 'a photo in the style of dots' (the colour goes too)."""
    if shape is None:
        return f"{prefix} in the style of {style}"
    noun = f"{colour} {shape}" if colour else shape
    text = f"{prefix} of {article(noun)} {noun}"
    return f"{text} in the style of {style}" if style else text


def sample_object(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Sample:
    shape, style = rng.choice(SHAPES), rng.choice(STYLES)
    colour = rng.choice(list(COLOURS))
    image, mask = render_object(shape, style, colour, size, rng)
    # Parts are dropped from captions so the model also answers "a photo of a star" or
    # "a picture in the style of dots", the prompts people and our M-Score templates use.
    drop_shape = rng.random() < 0.1
    caption = object_caption(
        None if drop_shape else shape,
        style if drop_shape or rng.random() > 0.25 else None,
        colour if rng.random() > 0.25 else None,
        rng.choice(PREFIXES),
    )
    labels = {
        "identity": NONE,
        "shape": SHAPES.index(shape),
        "style": STYLES.index(style),
        "colour": list(COLOURS).index(colour),
    }
    return Sample(image, mask, caption, labels)


def sample_face(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Sample:
    name = rng.choice(list(IDENTITIES))
    image, mask = render_face(name, size, rng)
    caption = f"{rng.choice([*PREFIXES, 'a portrait'])} of {name}"
    labels = {
        "identity": HEADS["identity"].index(name),
        "shape": NONE,
        "style": NONE,
        "colour": NONE,
    }
    return Sample(image, mask, caption, labels)


def sample(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Sample:
    """One random world sample (portrait or object)."""
    return sample_face(rng, size) if rng.random() < ID_FRACTION else sample_object(rng, size)


def dataset(n: int, seed: int, size: int = IMAGE_SIZE) -> dict[str, object]:
    """n samples as arrays: images uint8 [n,H,W,3], masks, captions, labels per head."""
    rng = np.random.default_rng(seed)
    items = [sample(rng, size) for _ in range(n)]
    return {
        "images": np.stack([s.image for s in items]),
        "masks": np.stack([s.mask for s in items]),
        "captions": [s.caption for s in items],
        "labels": {h: np.array([s.labels[h] for s in items]) for h in HEADS},
    }
