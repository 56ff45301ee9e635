"""The manifest's schema: the pydantic models of a build (concepts to forget and keep,
stage options, merge, evaluation), validated before any work starts. Defaults live on
the models below, one per line, each with the reason for its value (`fmn.manifest.load`
reads YAML into them; `fmn.manifest.files` checks what they name on disk).

These models are also the one home of every stage's defaults. The stage configs the
library runs on (`fmn.train.resteer.ResteerConfig`, `fmn.train.invert.InvertConfig`,
`fmn.merge.fuse.MergeConfig`) are dataclasses derived from them: each option's default is
read from here (`option_default`), they are filled from a model by keyword (`from_options`,
`from_manifest`), and the re-steering defaults that depend on the concept type come from
one function, `type_defaults`. `fmn forget`, `fmn merge` and `fmn run` therefore agree.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from fmn.manifest.files import ImageFolder, ModelSpec, _base_dir, _resolve

# How to regenerate the published schema after changing a model below.
SCHEMA_COMMAND = (
    "python -c \"from fmn.manifest import write_schema; write_schema('manifests/schema.json')\""
)

ConceptType = Literal["id", "object", "style", "nsfw"]
MaskName = Literal["auto", "face", "attention", "none"]
DetectorName = Literal["world", "face", "clip", "nudenet"]
ResteerParams = Literal["to_kv", "attn2", "unet"]
Positions = Literal["concept", "concept+eot", "all_eot", "concept+after"]
# How a concept is forgotten: by a gate on the text states (fmn/model/eraser.py), fitted in
# the merge, or by attention re-steering (its own patch); auto picks by type
Erase = Literal["auto", "gate", "resteer"]
# The types `erase: auto` gates. nsfw is re-steered: it stands for concepts reached through
# words nobody lists, and a gate never fires on a word of the vocabulary it was not given
# (its radius keeps every other word out, by construction).
GATED_TYPES = ("id", "object", "style")

# ---------------------------------------------------------------------------------------
# Field types shared by the models (and by their per-concept overrides)

_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def _slug_suggestion(value: str) -> str:
    """A slug close to `value` ('Van Gogh' -> 'van-gogh'), or 'van-gogh' when none is."""
    words = re.findall(r"[a-z0-9]+", value.lower())
    return "-".join(words)[:64].strip("-") or "van-gogh"


def _check_slug(value: str) -> str:
    if _SLUG.fullmatch(value):
        return value
    if not value:
        why = "it is empty"
    elif len(value) > 64:
        why = f"it is {len(value)} characters long, the limit is 64"
    elif any(c in value for c in "/\\.") or value.startswith("~"):
        why = "it becomes a file name, so '/', '\\' and '.' are not allowed"
    elif value != value.lower():
        why = "uppercase letters are not allowed"
    elif any(c.isspace() for c in value):
        why = "spaces are not allowed"
    elif value.startswith("-"):
        why = "it must start with a letter or digit"
    else:
        why = "only lowercase letters, digits and '-' are allowed"
    hint = f"use lowercase letters, digits and '-' (e.g. {_slug_suggestion(value)!r})"
    msg = f"invalid slug {value!r}: {why}"
    raise PydanticCustomError("slug", "{msg}", {"msg": msg, "hint": hint})


Slug = Annotated[str, AfterValidator(_check_slug)]
Count = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1)]
Seed = Annotated[int, Field(ge=0)]  # numpy and some samplers reject negative seeds
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]
# the audit's attacks, by the name gates and summaries give them (fmn.eval.result.ATTACKS
# titles them for reports)
ATTACK_NAMES = ("recovery", "phrasing", "prompt")
AttackName = Literal[ATTACK_NAMES]


# Tags of the unions below appear in pydantic's error locations; they are not keys a user
# wrote, so _problems drops them. '<' cannot start a field name, so none is mistaken.
_TAGS = {"<folder>", "<generate>", "<name>", "<masks>"}


def _tag(kind_if_str: str, kind_if_dict: str) -> Callable[[Any], str | None]:
    """Pick a union member by the YAML shape: a string, or a mapping."""

    def pick(value: Any) -> str | None:
        if isinstance(value, str | Path):
            return kind_if_str
        if isinstance(value, dict | BaseModel):
            return kind_if_dict
        return None

    return pick


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------
# Stage options, and the stage configs derived from them

# Re-steering options whose default depends on the concept type (ResteerOptions leaves
# them None). Every type starts from ANY_TYPE: the concept's own tokens and a light
# preservation term (none lets the edit spread to neighbours; a strong one stops an
# identity from moving in 35 steps). The causal text encoder carries a word into every
# later position: a style word ends its prompts, so styles add every end-of-text position
# and need a strong preservation term to keep the padding other prompts share in place;
# an object is often followed by "in the style of ...", so objects add the first
# end-of-text. Chosen by world-detector sweeps on tiny-world's carol, triangle and outline,
# so in sample (docs/resteer.md has the sweep, docs/world.md the measuring rule).
ANY_TYPE: dict[str, Any] = {"positions": "concept", "preserve_weight": 0.3}
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "object": {"positions": "concept+eot", "preserve_weight": 1.0},
    "style": {"positions": "all_eot", "preserve_weight": 10.0},
}


# The closed loop's rungs per type (fmn.train.loop), gentlest first: where a rung leaves
# the concept drawn and moves nothing it watches, the next one pushes harder (a lighter
# preservation term, or more positions, where the causal text encoder also carries the
# concept). The first rung is the type's defaults above, so a concept forgotten there gets
# the patch the fixed recipe made. The order was chosen on crowd-world's tune identities:
# some (michael) go at their own tokens, others (robert) only once every end-of-text
# position is steered (docs/resteer.md, "closed loop").
TYPE_LADDERS: dict[str, list[dict[str, Any]]] = {
    "id": [
        {"positions": "concept", "preserve_weight": 0.3},
        {"positions": "concept+eot", "preserve_weight": 0.3},
        {"positions": "all_eot", "preserve_weight": 10.0},
        {"positions": "all_eot", "preserve_weight": 1.0},
    ],
    "object": [
        {"positions": "concept+eot", "preserve_weight": 1.0},
        {"positions": "concept+eot", "preserve_weight": 0.3},
        {"positions": "all_eot", "preserve_weight": 10.0},
    ],
    "style": [
        {"positions": "all_eot", "preserve_weight": 10.0},
        {"positions": "all_eot", "preserve_weight": 3.0},
        {"positions": "all_eot", "preserve_weight": 1.0},
    ],
}


def type_ladder(concept_type: str) -> list[dict[str, Any]]:
    """The closed loop's rungs for a concept type (an identity's for nsfw, which starts
    from the same defaults): the one place they are decided."""
    return [dict(r) for r in TYPE_LADDERS.get(concept_type, TYPE_LADDERS["id"])]


def type_defaults(concept_type: str | None = None) -> dict[str, Any]:
    """The re-steering options whose default depends on the concept type, for that type
    (None: what every type starts from). The one place these defaults are decided:
    fmn.train.resteer.resteer_config_for, through which a manifest's concepts and `fmn forget`'s
    become configs, and `fmn forget --help` read them here."""
    return {**ANY_TYPE, **(TYPE_DEFAULTS.get(concept_type, {}) if concept_type else {})}


def option_default(model: type[BaseModel], name: str) -> Any:
    """The default of option `name` of a manifest model, as the manifest declares it (a
    fresh copy: pydantic copies list and dict defaults). What the stage configs' fields
    default to, and what CLI options that are left out fall back to and their help shows.

    Why the stage configs (fmn.train.resteer.ResteerConfig, fmn.train.invert.InvertConfig,
    fmn.merge.fuse.MergeConfig) are dataclasses derived from these models rather than the models
    themselves: they carry knobs that are no manifest option (timestep range, gradient
    clipping, prompt templates), which must not be accepted in a manifest nor appear in its
    published schema; they live in torch modules, while this module must import without
    torch (`fmn validate`, the schema, the CLI's help); and patches and TI files record
    them as plain dicts. Reading each shared default from here keeps one source: a default
    changed here changes the library, `fmn forget` and `fmn run` alike."""
    return model.model_fields[name].get_default(call_default_factory=True)


def option_factory(model: type[BaseModel], name: str) -> Callable[[], Any]:
    """option_default as a dataclass `default_factory`, for list, dict and None defaults
    (each config gets its own copy)."""
    return functools.partial(option_default, model, name)


class InvertOptions(_Strict):
    """Textual inversion: learn tokens for the concept from its images (fmn/train/invert.py)."""

    enabled: bool = False  # ~10x the steps of re-steering; only needed when the name is weak
    """Learn tokens before re-steering; the re-steering prompts then use them."""
    tokens: Count = 4  # room for a concept one word cannot hold, short enough for prompts
    """Number of learned tokens."""
    steps: Count = 300  # tokens only need to point at the concept, not reproduce it
    """Optimisation steps."""
    # Adam moves every coordinate by up to ~lr per step, and CLIP token embeddings have a
    # per-coordinate scale of ~0.01-0.03: 1e-3 x 300 steps can travel many token norms
    # already; higher overshoots into embeddings that no prompt word is near
    lr: PositiveFloat = 1e-3
    """Learning rate of the token embeddings."""
    # None: a generic word of the type (fmn.train.invert.GENERIC_WORDS), not the concept's name,
    # so the tokens find the concept from its images rather than start on it
    init_words: list[Text] | None = Field(None, min_length=1)
    """Words whose embeddings initialise the tokens (default: a generic word for the type:
    object, person, style, nude)."""


class ResteerOptions(_Strict):
    """Attention re-steering: train cross-attention to stop attending to the concept."""

    steps: Count = 35  # the original Forget-Me-Not recipe; more starts to hurt neighbours
    """Optimisation steps."""
    # AdamW. With the preservation term, the rate at which tiny-world's carol, triangle and
    # outline were forgotten with the rest kept, in a detector sweep on those same three
    # (in sample: docs/resteer.md); lower rates left the identity in place in 35 steps
    lr: PositiveFloat = 3e-3
    """Learning rate."""
    # None: by concept type (type_defaults): 0.3; 1 for objects, 10 for styles
    preserve_weight: NonNegativeFloat | None = None
    """Weight of the term that keeps generic and preserved prompts' keys/values at the base's."""
    params: ResteerParams = "to_kv"  # smallest patch, and the one closed-form merge fuses
    """Trainable parameters: attn2 to_k and to_v, all of attn2, or the whole UNet."""
    # None: by concept type (type_defaults): the concept's tokens; plus the first
    # end-of-text for objects, plus all end-of-text for styles
    positions: Positions | None = None
    """Token positions whose attention is suppressed (end-of-text also carries the concept)."""
    # face for identities, attention-derived for everything else. The default of every way
    # to build a patch (a manifest, `fmn forget`, fmn.train.forget.forget_concept)
    mask: MaskName = "auto"
    """Pixels that enter the loss (re-steering's and, when enabled, textual inversion's):
    face boxes, the base model's attention map, or all."""
    batch: Count = 4  # a few images per step steady the loss; memory grows with it
    """Images per step."""
    seed: Seed = 0  # fixed, so a rerun reproduces the same patch
    """Random seed (noise, timesteps, image order)."""
    # on: a fixed strength misses some concepts and destroys a neighbour of others, and
    # where the edge lies differs per concept (docs/resteer.md)
    loop: bool = True
    """Closed loop: the base model judges each patch; re-steer harder while the concept is
    still drawn, stop and fail by name when a watched concept moves (fmn/train/loop.py).
    Setting positions or preserve_weight pins the loop to that one rung (still judged)."""


class InvertOverride(_Strict):
    """Per-concept changes to `defaults.invert`; keys left out keep the default."""

    enabled: bool | None = None
    tokens: Count | None = None
    steps: Count | None = None
    lr: PositiveFloat | None = None
    init_words: list[Text] | None = Field(None, min_length=1)


class ResteerOverride(_Strict):
    """Per-concept changes to `defaults.resteer`; keys left out keep the default."""

    steps: Count | None = None
    lr: PositiveFloat | None = None
    preserve_weight: NonNegativeFloat | None = None
    params: ResteerParams | None = None
    positions: Positions | None = None
    mask: MaskName | None = None
    batch: Count | None = None
    seed: Seed | None = None
    loop: bool | None = None


class CorrectOptions(_Strict):
    """Correction (`action: correct`): train the concept's cross-attention keys/values so
    that its prompts draw its guide's images (fmn/train/correct.py)."""

    # Chosen on crowd-world's checker (a tune concept) in a detector sweep of lr 3e-3 to
    # 3e-2 and 200 to 800 steps, on 64 images per setting at tune seeds (docs/correct.md);
    # the held-out role word was never tried
    steps: Count = 600
    """Optimisation steps."""
    lr: PositiveFloat = 3e-3
    """Learning rate (AdamW)."""
    preserve_weight: NonNegativeFloat = 1.0  # as re-steering's objects: generic prompts hold
    """Weight of the term that keeps generic and preserved prompts' keys/values at the base's."""
    generate: int = Field(16, ge=1, le=1024)  # as a concept's own generated images
    """Guide images drawn from the guide's prompts (a guide folder is used whole)."""
    seed: Seed = 0
    """Random seed of the guide images and the training draws."""


class Defaults(_Strict):
    """Stage options for every concept, unless a concept overrides them."""

    invert: InvertOptions = InvertOptions()
    """Textual inversion options."""
    resteer: ResteerOptions = ResteerOptions()
    """Attention re-steering options."""
    correct: CorrectOptions = CorrectOptions()
    """Correction options (concepts with `action: correct`)."""
    # 1: one concept per pass, each in a task of its own. More shares every UNet pass
    # between that many concepts (fmn.train.resteer_batch): the same patches, ~3x less time per
    # concept at 6 (bench/results/resteer.md); memory grows with it
    train_together: Count = 1
    """Concepts re-steered together in one batched pass, each still into its own patch."""
    # auto: the gate, which forgot every target and kept every other concept where
    # re-steering and the closed-form peers took others with them (chosen on tune
    # identities, objects and styles: docs/mass.md "Gated erasure"); for a correction
    # towards guide prompts its route, which drew a tune stand-in's five guides evenly
    # where training drew one (docs/correct.md)
    erase: Erase = "auto"
    """How concepts are forgotten: gate (a gate on the text states, fitted at merge time,
    no images; for a correction, a route to its guide prompts' words in turn), resteer
    (attention re-steering; a correction trains towards its guide's images), or auto: gate
    for identities, objects and styles (unless they learn tokens first: invert.enabled, or
    the merge is joint; a correction only with guide prompts), resteer for nsfw and for
    corrections towards a folder of images."""


# ---------------------------------------------------------------------------------------
# Concepts


GENERATED_IMAGES = 16  # no data to collect; 16 covers seeds and poses


class Generate(_Strict):
    """Have the base model draw the concept's training images from its text."""

    generate: int = Field(ge=1, le=1024)
    """Number of images to generate (1 to 1024)."""


class MaskFolder(_Strict):
    """User-supplied masks: one image per training image, white where the concept is."""

    folder: ImageFolder
    """Folder of mask images (relative paths start at the manifest's folder)."""


Images = Annotated[
    Annotated[ImageFolder, Tag("<folder>")] | Annotated[Generate, Tag("<generate>")],
    Discriminator(
        _tag("<folder>", "<generate>"),
        custom_error_type="images_kind",
        custom_error_message="must be a folder path or {generate: N}",
    ),
]
Mask = Annotated[
    Annotated[MaskName, Tag("<name>")] | Annotated[MaskFolder, Tag("<masks>")],
    Discriminator(
        _tag("<name>", "<masks>"),
        custom_error_type="mask_kind",
        custom_error_message="must be a mask name or {folder: path}",
    ),
]


def concept_words(text: str, words: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The phrasings that reach a concept: `text` first, then the other listed `words`."""
    return (text, *[w for w in words or () if w != text])


class PreservedConcept(_Strict):
    """A concept that must survive: it is measured, and it anchors the closed-form merge."""

    id: Slug
    """Slug (lowercase letters, digits, '-'); file and token names derive from it."""
    type: ConceptType
    """Kind of concept; picks prompt templates and the detector."""
    text: Text | None = None  # None: the id with '-' as space, which is how people write it
    """How prompts name the concept (default: the id with '-' as space)."""

    @model_validator(mode="after")
    def _default_text(self) -> PreservedConcept:
        if self.text is None:
            self.text = self.id.replace("-", " ")
        return self


GUIDE_HINT = "{prompts: [a photo of ..., ...]} or {images: folder}"


class Guide(_Strict):
    """What a corrected concept should draw: prompts, or a folder of images (one of them)."""

    prompts: list[Text] | None = Field(None, min_length=1)
    """Prompts of what the word should draw, in turn, e.g. [a photo of john, a photo of
    mary]. Gated (the default), each without its type's template ("john") replaces the
    word in the next prompt it fires on; re-steered, the base model draws the guide images
    from them."""
    images: ImageFolder | None = None
    """Or: a folder of guide images (relative paths start at the manifest's folder)."""
    concepts: list[Slug] = []  # none: the audit measures the word as itself only
    """Ids of the concepts the guide shows (e.g. [john, mary]): the audit reports the
    share of the corrected word's images the detector gives each (a diversity measure)."""

    @model_validator(mode="after")
    def _one(self) -> Guide:
        if (self.prompts is None) == (self.images is None):
            raise PydanticCustomError(
                "guide_kind", "give either prompts or images", {"hint": GUIDE_HINT}
            )
        return self


class Concept(PreservedConcept):
    """A concept to forget (or, with `action: correct`, to correct)."""

    action: Literal["forget", "correct"] = "forget"
    """forget: take the concept out; correct: make it draw its `guide` instead (erase
    says how: a route to the guide prompts' words, or training towards the guide)."""
    guide: Guide | None = None  # only with action: correct
    """What a corrected concept should draw: {prompts: [...]} or {images: folder}."""

    words: list[Text] | None = Field(None, min_length=1)  # None: the concept's text alone
    """Every listed word or phrase that reaches the concept (e.g. [night, midnight]):
    training prompts and images cycle over them, and the audit scores them all. `text`,
    when also given, is one of them (added first if missing)."""
    images: Images = Generate(generate=GENERATED_IMAGES)
    """Training images: a folder (relative to the manifest) or {generate: N}."""
    mask: Mask | None = None  # None: use resteer.mask
    """Mask for this concept: a mask name, or {folder: path} for user masks."""
    invert: InvertOverride = Field(default_factory=InvertOverride)
    """Changes to defaults.invert for this concept."""
    resteer: ResteerOverride = Field(default_factory=ResteerOverride)
    """Changes to defaults.resteer for this concept."""
    erase: Erase | None = None  # None: defaults.erase
    """How this concept is forgotten (gate, resteer or auto), if not as defaults.erase says."""

    @field_validator("words")
    @classmethod
    def _distinct(cls, words: list[str] | None) -> list[str] | None:
        twice = sorted({w for w in words or () if words.count(w) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(map(repr, twice))} more than once")
        return words

    @model_validator(mode="after")
    def _words(self) -> Concept:
        if self.words is None:
            return self
        if "text" not in self.model_fields_set:
            self.text = self.words[0]
        elif self.text not in self.words:
            self.words = [self.text, *self.words]
        return self

    @property
    def phrasings(self) -> tuple[str, ...]:
        """The words that reach the concept, its text first."""
        return concept_words(self.text, self.words)


class ResolvedConcept(_Strict):
    """A concept with everything decided: defaults applied, paths absolute."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: ConceptType
    text: str
    words: tuple[str, ...]
    """Every phrasing that reaches the concept, `text` first (just `text` for most)."""
    action: Literal["forget", "correct"]
    guide_prompts: tuple[str, ...]
    """A corrected concept's guide prompts (empty otherwise)."""
    guide_images: Path | None
    """A corrected concept's absolute guide folder, or None."""
    guide_concepts: tuple[str, ...]
    """The concepts a corrected concept's guide shows (for the audit; empty otherwise)."""
    correct: CorrectOptions
    images: Path | None
    """Absolute image folder, or None when the images are generated."""
    generate: int | None
    """Number of images to generate, or None when they come from a folder."""
    mask: MaskName | Path
    """The mask to use: resteer.mask, or the absolute folder of user masks, which wins."""
    invert: InvertOptions
    resteer: ResteerOptions
    erase: Literal["gate", "resteer"] = "resteer"
    """gate: erased by the merge's text-state gate (no images, no patch of its own)."""


# ---------------------------------------------------------------------------------------
# Merge and evaluation


class Merge(_Strict):
    """How the per-concept patches become one model (fmn/merge/fuse.py)."""

    # sum interferes past a few concepts; joint trains all concepts in one run (a baseline)
    method: Literal["sum", "closed-form", "joint"] = "closed-form"
    """sum: weighted sum of deltas; closed-form: least-squares fusion that holds preserved
    concepts in place; joint: one re-steering run over every concept (docs/merge.md)."""
    weights: dict[str, PositiveFloat] = {}  # equal say for every concept
    """Weight of each concept's patch, by id; concepts left out weigh 1.0."""
    # At 1 a preserved concept weighs what a target weighs; the lower value forgot more at
    # about the same retention in tiny-world's merge benchmark, whose detector sweep chose
    # it on the same concepts it reports (in sample: docs/merge.md, docs/world.md)
    preserve_weight: PositiveFloat = 0.3
    """closed-form: weight of the preserved and generic prompts against one concept's edit."""
    ridge: PositiveFloat = 1e-3  # only holds directions no prompt constrains
    """closed-form: pull towards the base weights, relative to the statistics' scale."""
    # off: the trade-off it buys is the user's to choose (docs/merge.md has the world's sweep)
    erase_weight: NonNegativeFloat = 0.0
    """closed-form: also map each concept's prompts to its anchor's (`erase_to`), at this
    weight against its patch's own edit (0: fuse the patches as they are)."""
    erase_to: Literal["anchor", "removed"] = "anchor"  # removed measured worse (docs/merge.md)
    """closed-form erase target: the prompt with the concept replaced by an anchor word
    (`anchors`, else by type: a person, thing, painting) or the prompt without it."""
    anchors: dict[str, Text] = {}  # others: by type (fmn.data.anchors.ERASE_ANCHORS)
    """Anchor text per concept id for erase_to: anchor, e.g. {mickey: a cartoon mouse}."""
    choose_anchors: bool = False  # costs a few images per candidate word (docs/merge.md)
    """closed-form erase: per type, pick the plain anchor word whose images the base model
    itself least attributes to a target (concepts named in `anchors` keep theirs)."""
    overshoot: NonNegativeFloat = 0.0  # ESD's negative guidance; 1 is ESD's own default
    """closed-form erase: push each concept past its anchor, away from itself, by this
    share of the concept-to-anchor distance."""
    tune: bool = False  # 9 merges, each judged on a few images per concept
    """closed-form: try a fixed grid of preserve/erase weights and overshoot, keep the
    merge the base model itself judges best (docs/merge.md); needs `preserve`."""
    # off: it also reads a user's own textual inversions as their nearest words
    robust: bool = False
    """Robust mode: the gates also read every token as a word of the base model's own
    vocabulary (a token a textual inversion learned becomes its nearest word), so that an
    inversion attack cannot go around them (docs/mass.md "Robust mode"). Needs a gated
    concept."""


class Detectors(_Strict):
    """Detector that measures each concept type."""

    id: DetectorName = "world"  # the embedded world is the default base model
    """Detector for identities."""
    object: DetectorName = "world"  # as above; use clip on real models
    """Detector for objects."""
    style: DetectorName = "world"  # as above; use clip on real models
    """Detector for styles."""
    nsfw: DetectorName = "nudenet"  # the only one trained on nudity
    """Detector for NSFW content."""


class Gates(_Strict):
    """Thresholds that fail the build."""

    target_mscore_max: Fraction = 0.1  # 1 image in 10 may still show it (detector noise)
    """Highest M-Score a forgotten concept may keep (0 to 1)."""
    preserve_ratio_min: Ratio = 0.9  # a preserved concept may lose at most 10%
    """Lowest M-Score ratio (patched / base) a preserved concept may fall to (0 to 10)."""
    recovery_max: Ratio | None = None  # unset: attacks are reported, not gated
    """Highest ratio (attacked / base M-Score) any attack that runs (evaluate.recovery,
    evaluate.phrasing, evaluate.prompt_attack) may bring a target back to."""
    attack_max: dict[AttackName, Ratio] = {}  # none: recovery_max holds for every attack
    """A highest ratio of an attack's own, by attack (recovery, phrasing, prompt), e.g.
    {prompt: 0.2}; it overrides recovery_max for that attack."""

    def attack_limit(self, attack: str) -> float | None:
        """The ratio an attack may bring a target back to (None: not gated)."""
        return self.attack_max.get(attack, self.recovery_max)


class Evaluate(_Strict):
    """How M-Scores are measured on the base and the patched model."""

    prompts_per_concept: Count = 10  # averages out prompt wording; cheap on CPU
    """Prompt templates per concept."""
    seeds: list[Seed] = Field([0, 1, 2, 3], min_length=1)  # 10 prompts x 4 seeds = 40 images
    """Seeds; every prompt is drawn once per seed."""
    detectors: Detectors = Detectors()
    """Detector per concept type: world, face, clip or nudenet."""
    steps: Count = 25  # samplers stop improving visibly around here
    """Inference steps per image."""
    guidance: float = Field(5.0, ge=0, allow_inf_nan=False)  # shows the concept, no saturation
    """Classifier-free guidance scale."""
    gates: Gates = Gates()
    """Thresholds that fail the build."""
    recovery: bool = False  # an attack per target costs a textual inversion: opt in
    """Run the recovery attack in `fmn run` and `fmn audit`: textual inversion of each
    target's training images on the audited model, scored like the target."""
    recovery_seeds: Count = 1  # each seed costs a textual inversion
    """Inversion seeds the recovery attack tries per target; the one that brings it back
    most counts."""
    phrasing: bool = False  # a scoring pass per phrasing: opt in
    """Run the phrasing attack in `fmn run` and `fmn audit`: each target drawn under its
    other words (evaluate.phrasings, and an embedded world's own phrasings), scored like
    the target; the best one counts."""
    prompt_attack: bool = False  # a vocabulary search per target, as long as an inversion
    """Run the prompt attack in `fmn run` and `fmn audit`: a white-box search over the
    tokenizer's real words for a prompt that makes the audited model draw each target
    (SD1/SD2), scored like the target."""
    phrasings: dict[Slug, list[Text]] = {}  # none: only an embedded world's own phrasings
    """Other words for a target that the phrasing attack tries, by target id (synonyms,
    paraphrases, misspellings)."""
    face_weights: Path | None = None  # no download here: the user brings the weights
    """InceptionResnetV1 state dict for the face detector (.safetensors; a .pt file is read
    with torch.load(weights_only=True)); relative to the manifest's folder."""
    clip_model: Path | None = None  # a local folder: CLIPModel weights, tokenizer, preprocessor
    """Local CLIP model folder (transformers layout) for the clip detector."""
    references: dict[Slug, ImageFolder] = {}  # default: a concept's own images folder
    """Reference images per concept id, matched by the face detector."""

    @model_validator(mode="after")
    def _detector_weights(self) -> Evaluate:
        chosen = set(self.detectors.model_dump().values())
        for name, field in (("face", "face_weights"), ("clip", "clip_model")):
            if name in chosen and getattr(self, field) is None:
                msg = f"the {name} detector is chosen but evaluate.{field} is not set"
                hint = f"set evaluate.{field} to a local path (nothing is downloaded)"
                raise PydanticCustomError("detector_weights", "{msg}", {"msg": msg, "hint": hint})
        return self

    def attacks_on(self) -> dict[str, bool]:
        """Whether each attack runs, by its name in gates.attack_max."""
        return {"recovery": self.recovery, "phrasing": self.phrasing, "prompt": self.prompt_attack}

    @model_validator(mode="after")
    def _recovery_gate(self) -> Evaluate:
        on = self.attacks_on()
        if self.gates.recovery_max is not None and not any(on.values()):
            msg = "evaluate.gates.recovery_max is set but no attack runs"
            hint = "set evaluate.recovery, phrasing or prompt_attack to true, or remove the gate"
            raise PydanticCustomError("recovery_gate", "{msg}", {"msg": msg, "hint": hint})
        for attack in self.gates.attack_max:
            if not on[attack]:
                switch = "prompt_attack" if attack == "prompt" else attack
                msg = f"evaluate.gates.attack_max.{attack} is set but that attack does not run"
                hint = f"set evaluate.{switch}: true, or remove the gate"
                raise PydanticCustomError("recovery_gate", "{msg}", {"msg": msg, "hint": hint})
        return self


# ---------------------------------------------------------------------------------------
# The manifest


class Manifest(_Strict):
    """A build: concepts to forget and preserve, stage options, merge and evaluation."""

    name: Slug
    """Slug that names the output folders and the report."""
    base_model: ModelSpec = "embedded:tiny-world"  # ships with the package: runs with no download
    """embedded:tiny-world, a diffusers folder, a .safetensors/.ckpt file, or a hub id."""
    defaults: Defaults = Defaults()
    """Stage options for every concept."""
    concepts: list[Concept] = Field(min_length=1)
    """Concepts to forget (at least one)."""
    preserve: list[PreservedConcept] = []  # none: gates then judge the targets alone
    """Concepts that must survive: {id, type, text?}. A trained correction holds their
    keys/values too: list a corrected word's neighbours here (docs/correct.md)."""
    merge: Merge = Merge()
    """How patches become one model."""
    evaluate: Evaluate = Evaluate()
    """How forgetting and preserving are measured."""
    on_error: Literal["fail", "skip"] = "fail"  # a nightly build must not ship half a patch
    """fail: stop the build; skip: merge the rest and mark the concept failed."""

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Manifest:
        self._base_dir = _base_dir(info)
        errors = [
            InitErrorDetails(
                type=PydanticCustomError(kind, "{msg}", {"msg": msg, "hint": hint}),
                loc=loc,
                input=None,
            )
            for kind, loc, msg, hint in self._cross_problems()
        ]
        if errors:
            # Raised as is, so each error keeps its own location (a ValueError would not).
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def _cross_problems(self) -> list[tuple[str, tuple[str | int, ...], str, str]]:
        """Rules that span fields: unique ids, known weight ids, one place for a mask, a
        guide exactly where a concept is corrected."""
        out = []
        for i, c in enumerate(self.concepts):
            if c.action == "correct" and c.guide is None:
                msg = "action: correct needs a guide"
                out.append(("guide_missing", ("concepts", i, "guide"), msg, GUIDE_HINT))
            elif c.action == "correct" and "images" in c.model_fields_set:
                msg = "a correction trains on its guide's images, not on images of its own"
                out.append(
                    (
                        "correct_images",
                        ("concepts", i, "images"),
                        msg,
                        "move them to guide: {images: folder}",
                    )
                )
            elif c.action == "correct" and self.merge.method == "joint":
                msg = (
                    "a corrected concept cannot be re-steered with the others (merge.method: joint)"
                )
                out.append(
                    (
                        "correct_joint",
                        ("concepts", i, "action"),
                        msg,
                        "use merge.method closed-form or sum",
                    )
                )
            elif c.action == "correct" and _overlay(self.defaults.invert, c.invert).enabled:
                msg = "a correction trains the concept's own words: no textual inversion"
                out.append(
                    (
                        "correct_invert",
                        ("concepts", i, "invert"),
                        msg,
                        "set invert: {enabled: false}",
                    )
                )
            elif c.action == "forget" and c.guide is not None:
                msg = "a guide is only used with action: correct"
                out.append(
                    (
                        "guide_unused",
                        ("concepts", i, "guide"),
                        msg,
                        "drop it, or add action: correct",
                    )
                )
        for i, c in enumerate(self.concepts):
            if (c.erase or self.defaults.erase) != "gate":
                continue
            where = ("concepts", i, "erase") if c.erase else ("defaults", "erase")
            if c.action == "correct" and c.guide is not None and c.guide.images is not None:
                msg = "a gate routes a corrected word to its guide's words; a folder has none"
                hint = "set erase: resteer for it, or give guide prompts"
                out.append(("gate_correct", where, msg, hint))
            elif self.merge.method == "joint":
                msg = "merge.method joint re-steers every concept; the gate is fitted in the merge"
                out.append(("gate_joint", where, msg, "use merge.method closed-form or sum"))
            elif _overlay(self.defaults.invert, c.invert).enabled:
                msg = "a gated concept draws no images and learns no tokens"
                out.append(("gate_invert", where, msg, "set invert: {enabled: false}"))
        joint = self.merge.method == "joint"
        if self.merge.robust and not any(
            erase_of(c, self.defaults, joint=joint) == "gate" for c in self.concepts
        ):
            msg = "robust mode locks the vocabulary for the gates, and no concept is gated"
            hint = "set erase: gate (or auto) for identities, objects or styles, or drop it"
            out.append(("robust_ungated", ("merge", "robust"), msg, hint))
        first: dict[str, str] = {}
        for section, items in (("concepts", self.concepts), ("preserve", self.preserve)):
            for i, c in enumerate(items):
                here = f"{section}.{i}.id"
                if c.id in first:
                    msg = f"duplicate id {c.id!r} (first at {first[c.id]})"
                    hint = "ids name files and patches, so each may appear once in the manifest"
                    out.append(("duplicate_id", (section, i, "id"), msg, hint))
                else:
                    first[c.id] = here
        targets = list(dict.fromkeys(c.id for c in self.concepts))
        named_by = {
            ("merge", "weights"): self.merge.weights,
            ("merge", "anchors"): self.merge.anchors,
            ("evaluate", "phrasings"): self.evaluate.phrasings,
        }
        for (section, field), named in named_by.items():
            for key in named:
                if key not in targets:
                    msg = f"{key!r} is not a concept to forget"
                    hint = _did_you_mean(key, targets, "concepts to forget")
                    out.append(("unknown_id", (section, field, key), msg, hint))
        for i, c in enumerate(self.concepts):
            if c.mask is not None and c.resteer.mask is not None:
                msg = "the mask is set twice (here and in resteer.mask)"
                out.append(("mask_twice", ("concepts", i, "mask"), msg, "keep one of the two"))
        if not self.base_model.startswith("embedded:"):
            chosen = self.evaluate.detectors.model_dump()
            for kind in dict.fromkeys(c.type for c in [*self.concepts, *self.preserve]):
                if chosen.get(kind) == "world":
                    msg = (
                        f"{kind} concepts are measured by the world detector, which knows only "
                        f"the embedded worlds, and base_model is {self.base_model!r}"
                    )
                    hint = "set it to clip, face or nudenet (with their weights under evaluate)"
                    out.append(("world_detector", ("evaluate", "detectors", kind), msg, hint))
        return out

    @property
    def base_dir(self) -> Path:
        """The folder relative paths start from (the manifest's folder when loaded)."""
        return self._base_dir

    def resolve(self, concept_id: str) -> ResolvedConcept:
        """A concept with the defaults overlaid by its overrides, and absolute paths."""
        by_id = {c.id: c for c in self.concepts}
        if concept_id not in by_id:
            raise KeyError(f"no concept {concept_id!r} in manifest {self.name!r}; {list(by_id)}")
        joint = self.merge.method == "joint"  # one re-steering run over every concept
        return resolve_concept(by_id[concept_id], self.defaults, self.base_dir, joint=joint)

    def resolved_concepts(self) -> list[ResolvedConcept]:
        """Every concept to forget, resolved, in manifest order."""
        return [self.resolve(c.id) for c in self.concepts]


def erase_of(c: Concept, defaults: Defaults, *, joint: bool = False) -> Literal["gate", "resteer"]:
    """How `c` is forgotten: its `erase`, else defaults.erase; auto gates identities,
    objects and styles (a correction only towards guide prompts: a route) unless they
    learn tokens or the merge is joint, and re-steers the rest."""
    erase = c.erase or defaults.erase
    if erase != "auto":
        return erase
    routed = c.action == "correct" and c.guide is not None and c.guide.prompts is not None
    gated = c.type in GATED_TYPES and (c.action == "forget" or routed)
    return (
        "gate"
        if gated and not joint and not _overlay(defaults.invert, c.invert).enabled
        else "resteer"
    )


def resolve_concept(
    c: Concept, defaults: Defaults, base_dir: Path, *, joint: bool = False
) -> ResolvedConcept:
    """`c` with `defaults` overlaid by its overrides, and paths made absolute from
    `base_dir`: how a manifest resolves its concepts, and how `fmn forget` resolves its
    options (with Defaults()), so that both build the same patch. joint: the manifest's
    merge re-steers every concept in one run, so `erase: auto` re-steers them all."""
    invert = _overlay(defaults.invert, c.invert)
    resteer = _overlay(defaults.resteer, c.resteer)
    if isinstance(c.mask, str):
        resteer = resteer.model_copy(update={"mask": c.mask})
    folder = c.images if isinstance(c.images, Path) else None
    erase = erase_of(c, defaults, joint=joint)
    if isinstance(c.mask, MaskFolder):
        mask: MaskName | Path = _resolve(c.mask.folder, base_dir)
    else:
        mask = resteer.mask
    return ResolvedConcept(
        id=c.id,
        type=c.type,
        text=c.text,
        words=c.phrasings,
        action=c.action,
        guide_prompts=tuple(c.guide.prompts or ()) if c.guide else (),
        guide_images=_resolve(c.guide.images, base_dir) if c.guide and c.guide.images else None,
        guide_concepts=tuple(c.guide.concepts) if c.guide else (),
        correct=defaults.correct,
        images=None if folder is None else _resolve(folder, base_dir),
        generate=c.images.generate if isinstance(c.images, Generate) else None,
        mask=mask,
        invert=invert,
        resteer=resteer,
        erase=erase,
    )


_Options = TypeVar("_Options", InvertOptions, ResteerOptions)


def _overlay(defaults: _Options, override: BaseModel) -> _Options:
    return defaults.model_copy(update=override.model_dump(exclude_none=True))


def _did_you_mean(key: str, valid: list[str], what: str = "valid keys here") -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    listing = f"{what} are: {', '.join(valid)}"
    return f"did you mean {close[0]!r}? {listing}" if close else listing


# ---------------------------------------------------------------------------------------
# Published JSON schema (manifests/schema.json), for editors and other tools


def manifest_schema() -> dict[str, Any]:
    """The JSON schema of a manifest (validation side)."""
    schema = Manifest.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def write_schema(path: str | Path) -> Path:
    """Write manifest_schema() as pretty JSON, atomically (temp file + rename)."""
    path = Path(path)
    text = json.dumps(manifest_schema(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
