"""The concepts of the embedded worlds: one table per world, read by the generator, the
classifier, the detector and the CLI. Colours are a nuisance variable (they vary, but are
never a concept).

Two worlds ship:
- `tiny-world`: 8 identities, 8 objects, 8 styles; fast, the test suite's world. Every
  one of its concepts was looked at while the project's defaults were chosen, so its
  numbers are in sample (`split: tune` throughout).
- `crowd-world`: 192 identities built from shared attributes, 12 objects, 12 styles,
  two concepts reached through several phrasings and a biased role word, with a
  tune/held-out split drawn by a recorded seed (docs/world.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
TYPE_TO_HEAD = {"id": "identity", "object": "shape", "style": "style"}
SPLITS = ("tune", "heldout")

# --- tiny-world --------------------------------------------------------------------------
# Cartoon identities: each differs from every other in at least two coarse features
# (hair colour/style, skin, accessory), because 8x8 latents blur fine details away.
TINY_IDENTITIES: dict[str, dict[str, str]] = {
    "alice": {"skin": "light", "hair": "blonde", "hairstyle": "long", "extra": "bow"},
    "bob": {"skin": "tan", "hair": "black", "hairstyle": "short", "extra": "glasses"},
    "carol": {"skin": "brown", "hair": "red", "hairstyle": "bun", "extra": "none"},
    "dave": {"skin": "light", "hair": "brown", "hairstyle": "spiky", "extra": "beard"},
    "eve": {"skin": "green", "hair": "purple", "hairstyle": "long", "extra": "none"},
    "frank": {"skin": "pale", "hair": "white", "hairstyle": "bald", "extra": "hat"},
    "grace": {"skin": "tan", "hair": "black", "hairstyle": "bun", "extra": "glasses"},
    "heidi": {"skin": "blue", "hair": "blonde", "hairstyle": "short", "extra": "beard"},
}
TINY_SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "crescent", "arrow"]
TINY_STYLES = ["flat", "stripes", "dots", "checker", "outline", "gradient", "night", "shadow"]

# --- crowd-world -------------------------------------------------------------------------
# Common first names that are one CLIP token each (tests assert it), none of them a word
# the world uses otherwise (no colours, shapes, styles, "ruby", "mark", ...).
CROWD_NAMES = """james john robert michael william david richard joseph thomas charles chris
daniel matthew anthony donald steven paul andrew josh kevin brian george tim ron jason edward
jeff ryan jacob gary nick eric jonathan stephen larry justin scott brandon ben greg alex
patrick dennis jerry tyler aaron jose adam nathan henry doug zach peter kyle ethan walter noah
jeremy harold keith roger terry gerald sean austin carl arthur lawrence dylan jesse jordan
bryan billy joe bruce gabriel logan albert willie alan juan wayne elijah randy roy vincent
ralph eugene russell bobby mason philip louis mary patricia jennifer linda elizabeth barbara
susan jessica sarah karen lisa nancy betty margaret sandra ashley emily donna michelle amanda
dorothy melissa deborah stephanie rebecca sharon laura cynthia kathy amy angela shirley anna
brenda pamela emma nicole helen samantha katherine christine debra rachel carolyn janet
catherine maria heather diane ruth julie olivia joyce virginia victoria kelly lauren
christina joan evelyn judith megan andrea cheryl hannah jacqueline martha gloria teresa ann
sara madison frances kathryn janice jean abigail judy sophia denise doris marilyn danielle
beverly isabella theresa diana natalie charlotte marie kayla alexis lori leo oscar hugo felix
otto ivan omar mia zoe lily ella chloe lucy nora clara nina tina""".split()  # noqa: SIM905
N_CROWD = 192  # >= 120 held out at 2/3: mass removal of 100 plus 20 never targeted
CROWD_ATTRIBUTES: dict[str, list[str]] = {
    "skin": ["pale", "light", "tan", "brown", "dark"],
    "hair": ["blonde", "black", "red", "brown", "grey", "pink"],
    "hairstyle": ["long", "short", "bun", "spiky"],
    "clothes": list(COLOURS),
    "extra": ["none", "glasses"],
}
CROWD_SEED = 2026  # draws the identities' attributes, the role's identities and the split
CROWD_SHAPES = [*TINY_SHAPES, "diamond", "bolt", "drop", "house"]
CROWD_STYLES = [*TINY_STYLES, "frame", "split", "inverted", "neon"]
# Concepts that captions reach through several phrasings (the proxy for NSFW and other
# implicit concepts). `True` marks a listed phrasing (manifests and prompt sets may name
# it); the unlisted ones appear only in training captions and in the phrasing audit.
CROWD_WORDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "night": (("night", True), ("midnight", True), ("dark", False), ("after sunset", False)),
    "heart": (("heart", True), ("valentine", True), ("love", False), ("love heart", False)),
}
CROWD_ROLE = "doctor"  # a biased word: 90% one identity, the rest split among four others
ROLE_SHARE = 0.9
ROLE_OTHERS = 4


@dataclass(frozen=True)
class WorldConcept:
    """A concept of a world as a manifest would name it."""

    id: str
    type: str  # id | object | style | role
    text: str
    split: str = "tune"
    # phrasings that reach the concept, as (text, listed); empty for one-word concepts
    words: tuple[tuple[str, bool], ...] = ()

    @property
    def head(self) -> str:
        return "identity" if self.type == "role" else TYPE_TO_HEAD[self.type]


@dataclass(frozen=True)
class Role:
    """A biased word: captions with it show `dominant` in `share` of images."""

    word: str
    dominant: str
    others: tuple[str, ...]
    share: float

    def weights(self) -> dict[str, float]:
        rest = (1 - self.share) / len(self.others)
        return {self.dominant: self.share, **dict.fromkeys(self.others, rest)}


@dataclass(frozen=True)
class World:
    """One embedded world: its concepts and how its images are drawn and captioned."""

    name: str
    identities: dict[str, dict[str, str]]
    shapes: list[str]
    styles: list[str]
    id_fraction: float  # share of portraits among training images
    words: dict[str, tuple[tuple[str, bool], ...]] = field(default_factory=dict)
    role: Role | None = None
    role_fraction: float = 0.0  # share of portraits captioned with the role word
    split_seed: int | None = None  # None: every concept is `tune` (an in-sample world)
    attributes: dict[str, list[str]] = field(default_factory=dict)  # identity attribute heads

    @property
    def colours(self) -> dict[str, tuple[int, int, int]]:
        return COLOURS

    @cached_property
    def heads(self) -> dict[str, list[str]]:
        """Classifier heads that measure concepts (class 0 of each is 'none')."""
        return {
            "identity": list(self.identities),
            "shape": self.shapes,
            "style": self.styles,
            "colour": list(COLOURS),
        }

    @cached_property
    def splits(self) -> dict[str, str]:
        """Concept id -> 'tune' | 'heldout'. Per type, floor(n/3) concepts are drawn for
        tuning with `split_seed`; the rest (at least two thirds) are held out."""
        groups = {
            "id": list(self.identities),
            "object": self.shapes,
            "style": self.styles,
        }
        if self.split_seed is None:
            return {c: "tune" for ids in groups.values() for c in ids} | (
                {self.role.word: "tune"} if self.role else {}
            )
        rng = np.random.default_rng(self.split_seed)
        out: dict[str, str] = {}
        for ids in groups.values():
            tune = set(rng.choice(ids, size=len(ids) // 3, replace=False).tolist())
            out |= {c: "tune" if c in tune else "heldout" for c in ids}
        if self.role:
            out[self.role.word] = "heldout"
        return out

    def concepts(self) -> list[WorldConcept]:
        """Every concept (identities, objects, styles, then the role word), fixed order."""
        s, w = self.splits, self.words
        out = [WorldConcept(n, "id", n, s[n]) for n in self.identities]
        out += [WorldConcept(x, "object", x, s[x], w.get(x, ())) for x in self.shapes]
        out += [WorldConcept(x, "style", x, s[x], w.get(x, ())) for x in self.styles]
        if self.role:
            out.append(WorldConcept(self.role.word, "role", self.role.word, s[self.role.word]))
        return out

    def get(self, concept_id: str) -> WorldConcept:
        """Look up a concept by id, with a hint listing the valid ones."""
        for c in self.concepts():
            if c.id == concept_id:
                return c
        valid = ", ".join(c.id for c in self.concepts()[:12])
        raise KeyError(
            f"{concept_id!r} is not a concept of {self.name}; valid ids: {valid}, ... "
            f"(`fmn world concepts --world {self.name}` lists all)"
        )

    def phrase(self, concept_id: str, rng: np.random.Generator) -> str:
        """The word a training caption uses for a concept: one of its phrasings, uniformly
        (the plain id for a one-word concept, without drawing from rng)."""
        words = self.words.get(concept_id)
        if not words:
            return concept_id
        return words[int(rng.integers(len(words)))][0]


def _crowd_identities() -> tuple[dict[str, dict[str, str]], Role]:
    """N_CROWD names, each given a distinct attribute combination drawn with CROWD_SEED
    (so nearest neighbours differ in one or two attributes, as real people resemble each
    other), and the role word's five identities."""
    rng = np.random.default_rng(CROWD_SEED)
    combos = list(itertools.product(*CROWD_ATTRIBUTES.values()))
    picked = rng.choice(len(combos), size=N_CROWD, replace=False)
    names = CROWD_NAMES[:N_CROWD]
    keys = list(CROWD_ATTRIBUTES)
    ids = {
        n: dict(zip(keys, combos[int(i)], strict=True)) for n, i in zip(names, picked, strict=True)
    }
    cast = rng.choice(names, size=1 + ROLE_OTHERS, replace=False).tolist()
    return ids, Role(CROWD_ROLE, cast[0], tuple(cast[1:]), ROLE_SHARE)


TINY = World("tiny-world", TINY_IDENTITIES, TINY_SHAPES, TINY_STYLES, id_fraction=0.3)
_CROWD_IDS, _CROWD_ROLE = _crowd_identities()
CROWD = World(
    "crowd-world",
    _CROWD_IDS,
    CROWD_SHAPES,
    CROWD_STYLES,
    id_fraction=0.6,
    words=CROWD_WORDS,
    role=_CROWD_ROLE,
    role_fraction=0.04,
    split_seed=CROWD_SEED,
    attributes=CROWD_ATTRIBUTES,
)
WORLDS = {w.name: w for w in (TINY, CROWD)}
DEFAULT_WORLD = TINY.name


def get_world(name: str = DEFAULT_WORLD) -> World:
    """A world by name (`tiny-world`, `crowd-world`), with the valid names in the error."""
    name = name.removeprefix("embedded:")
    if name not in WORLDS:
        raise KeyError(f"no embedded world {name!r}; one of: {', '.join(WORLDS)}")
    return WORLDS[name]


def attribute_distance(world: World, a: str, b: str) -> int:
    """How many attributes two identities differ in (crowd-world's neighbour measure)."""
    x, y = world.identities[a], world.identities[b]
    return sum(x[k] != y[k] for k in x)


def heldout_fraction(world: World, concept_type: str) -> float:
    ids = [c for c in world.concepts() if c.type == concept_type]
    return sum(c.split == "heldout" for c in ids) / max(1, len(ids))


# The tiny world's table under its historical names (its generator, tests and benches).
IDENTITIES = TINY.identities
SHAPES = TINY.shapes
STYLES = TINY.styles
HEADS = TINY.heads


def world_concepts(world: str = DEFAULT_WORLD) -> list[WorldConcept]:
    """Every concept of a world (identities, objects, styles), in a fixed order."""
    return get_world(world).concepts()


def get_concept(concept_id: str, world: str = DEFAULT_WORLD) -> WorldConcept:
    """Look up a world concept by id, with a hint listing the valid ones."""
    return get_world(world).get(concept_id)
