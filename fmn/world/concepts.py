"""The concepts of the embedded world: one table, read by the generator, the classifier
and the CLI. Colours are a nuisance variable (they vary, but are never a concept)."""

from __future__ import annotations

from dataclasses import dataclass

# Cartoon identities: each differs from every other in at least two coarse features
# (hair colour/style, skin, accessory), because 8x8 latents blur fine details away.
IDENTITIES: dict[str, dict[str, str]] = {
    "alice": {"skin": "light", "hair": "blonde", "hairstyle": "long", "extra": "bow"},
    "bob": {"skin": "tan", "hair": "black", "hairstyle": "short", "extra": "glasses"},
    "carol": {"skin": "brown", "hair": "red", "hairstyle": "bun", "extra": "none"},
    "dave": {"skin": "light", "hair": "brown", "hairstyle": "spiky", "extra": "beard"},
    "eve": {"skin": "green", "hair": "purple", "hairstyle": "long", "extra": "none"},
    "frank": {"skin": "pale", "hair": "white", "hairstyle": "bald", "extra": "hat"},
    "grace": {"skin": "tan", "hair": "black", "hairstyle": "bun", "extra": "glasses"},
    "heidi": {"skin": "blue", "hair": "blonde", "hairstyle": "short", "extra": "beard"},
}
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "crescent", "arrow"]
STYLES = ["flat", "stripes", "dots", "checker", "outline", "gradient", "night", "shadow"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}

# Category of each concept type in the world, and the classifier head that measures it.
HEADS = {"identity": list(IDENTITIES), "shape": SHAPES, "style": STYLES, "colour": list(COLOURS)}
TYPE_TO_HEAD = {"id": "identity", "object": "shape", "style": "style"}


@dataclass(frozen=True)
class WorldConcept:
    """A concept of the world as a manifest would name it."""

    id: str
    type: str  # id | object | style
    text: str

    @property
    def head(self) -> str:
        return TYPE_TO_HEAD[self.type]

    @property
    def index(self) -> int:
        return HEADS[self.head].index(self.id)


def world_concepts() -> list[WorldConcept]:
    """Every concept of the world (identities, objects, styles), in a fixed order."""
    out = [WorldConcept(n, "id", n) for n in IDENTITIES]
    out += [WorldConcept(s, "object", s) for s in SHAPES]
    out += [WorldConcept(s, "style", s) for s in STYLES]
    return out


def get_concept(concept_id: str) -> WorldConcept:
    """Look up a world concept by id, with a hint listing the valid ones."""
    for c in world_concepts():
        if c.id == concept_id:
            return c
    valid = ", ".join(c.id for c in world_concepts())
    raise KeyError(f"{concept_id!r} is not a concept of the embedded world; valid ids: {valid}")
