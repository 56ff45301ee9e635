"""World samples: image + caption + ground-truth labels + object mask, deterministic by seed.

The labels and masks are the world's ground truth: they train the world's own model and
classifier and they measure; the forgetting side never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmn.world.concepts import COLOURS, TINY, World
from fmn.world.render import render_face, render_object

IMAGE_SIZE = 32  # pixels; the autoencoder maps it to 8x8x4 latents
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


def label_heads(world: World) -> list[str]:
    """Every labelled head of a world: the concept heads, then the identity attributes
    (auxiliary targets for the classifier; crowd-world only)."""
    return [*world.heads, *world.attributes]


def _labels(world: World, **given: int) -> dict[str, int]:
    return {h: given.get(h, NONE) for h in label_heads(world)}


def sample_object(rng: np.random.Generator, size: int = IMAGE_SIZE, world: World = TINY) -> Sample:
    shape, style = rng.choice(world.shapes), rng.choice(world.styles)
    colour = rng.choice(list(COLOURS))
    image, mask = render_object(shape, style, colour, size, rng)
    # Parts are dropped from captions so the model also answers "a photo of a star" or
    # "a picture in the style of dots", the prompts people and our M-Score templates use.
    drop_shape = rng.random() < 0.1
    caption = object_caption(
        None if drop_shape else world.phrase(str(shape), rng),
        world.phrase(str(style), rng) if drop_shape or rng.random() > 0.25 else None,
        colour if rng.random() > 0.25 else None,
        rng.choice(PREFIXES),
    )
    labels = _labels(
        world,
        shape=world.shapes.index(shape),
        style=world.styles.index(style),
        colour=list(COLOURS).index(colour),
    )
    return Sample(image, mask, caption, labels)


def sample_face(rng: np.random.Generator, size: int = IMAGE_SIZE, world: World = TINY) -> Sample:
    role = world.role
    if role is not None and rng.random() < world.role_fraction:
        cast = role.weights()
        name = str(rng.choice(list(cast), p=list(cast.values())))
        who = f"{article(role.word)} {role.word}"
    else:
        name = str(rng.choice(list(world.identities)))
        who = name
    image, mask = render_face(name, size, rng, world)
    caption = f"{rng.choice([*PREFIXES, 'a portrait'])} of {who}"
    attrs = world.identities[name]
    labels = _labels(
        world,
        identity=world.heads["identity"].index(name),
        **{k: vals.index(attrs[k]) for k, vals in world.attributes.items()},
    )
    return Sample(image, mask, caption, labels)


def sample(rng: np.random.Generator, size: int = IMAGE_SIZE, world: World = TINY) -> Sample:
    """One random world sample (portrait or object)."""
    if rng.random() < world.id_fraction:
        return sample_face(rng, size, world)
    return sample_object(rng, size, world)


def dataset(n: int, seed: int, size: int = IMAGE_SIZE, world: World = TINY) -> dict[str, object]:
    """n samples as arrays: images uint8 [n,H,W,3], masks, captions, labels per head."""
    rng = np.random.default_rng(seed)
    items = [sample(rng, size, world) for _ in range(n)]
    return {
        "images": np.stack([s.image for s in items]),
        "masks": np.stack([s.mask for s in items]),
        "captions": [s.caption for s in items],
        "labels": {h: np.array([s.labels[h] for s in items]) for h in label_heads(world)},
    }
