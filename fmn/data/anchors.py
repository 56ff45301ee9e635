"""Generic anchor prompts: everyday words that a forgetting run must leave alone.

A real checkpoint comes with no list of "the other concepts", so re-steering keeps the
key/value projections of these generic prompts (plus the manifest's `preserve` list) at the
base model's. The list is plain English, written once, not chosen by looking at any
detector's results.
"""

from __future__ import annotations

GENERIC_WORDS: dict[str, list[str]] = {
    "id": [
        "a man",
        "a woman",
        "a child",
        "an old man",
        "a girl",
        "a boy",
        "john",
        "mary",
        "james",
        "linda",
        "michael",
        "sarah",
        "peter",
        "emma",
        "tom",
        "anna",
        "a doctor",
        "a teacher",
        "a king",
        "a queen",
    ],
    "object": [
        "dog",
        "cat",
        "car",
        "house",
        "tree",
        "flower",
        "bird",
        "chair",
        "cup",
        "ball",
        "book",
        "boat",
        "clock",
        "apple",
        "shoe",
        "lamp",
        "key",
        "bottle",
        "bicycle",
        "moon",
        "sun",
        "box",
        "door",
        "hat",
    ],
    "style": [
        "watercolor",
        "oil painting",
        "pencil sketch",
        "cartoon",
        "pixel art",
        "anime",
        "photograph",
        "ink drawing",
        "mosaic",
        "pop art",
        "impressionism",
        "cubism",
        "line art",
        "woodcut",
        "pastel",
        "graffiti",
    ],
    "nsfw": ["a person", "a beach", "a portrait", "a crowd", "a swimmer", "a statue"],
}

# What a forgotten concept's prompts are mapped to by the merge's erase term (fmn.merge.fuse,
# `erase_to: anchor`), as the closed-form editors map a concept to its super-category (MACE,
# UCE): plain words that fit every template of the type ("a photo of a thing"). A
# manifest can name its own per concept (`merge.anchors`).
ERASE_ANCHORS: dict[str, str] = {
    "id": "a person",
    "object": "thing",
    "style": "painting",
    "nsfw": "a person",
}

# What a gate does with a fired word of these types instead of replacing it by its anchor:
# it drops the word, with these words when they come right before it ("a cat in the style
# of dots" -> "a cat"), as UCE and ESD map an artist's style to the empty prompt. Chosen on
# tune styles and objects drawn in them (docs/mass.md). A concept's own `merge.anchors`
# entry replaces the word by that anchor instead.
GATE_DROPS: dict[str, str] = {"style": "in the style of"}

ANCHOR_TEMPLATES: dict[str, list[str]] = {
    "id": ["a photo of {}", "a portrait of {}"],
    "object": ["a photo of a {}", "a picture of a {}"],
    "style": ["a picture in the style of {}", "a photo of a house in the style of {}"],
    "nsfw": ["a photo of {}"],
}


def anchor_prompts(
    exclude: set[str] | None = None,
    *,
    context: list[str] | None = None,
    preserve: list[tuple[str, str]] | None = None,
) -> list[str]:
    """Prompts whose keys/values re-steering must keep:
    - the empty prompt (classifier-free guidance's unconditional branch);
    - `context`: the concept's own prompts with the concept removed ("a photo of a"), so the
      words around the concept keep their meaning;
    - `preserve`: (text, type) of concepts the manifest says must survive, in every template;
    - every generic word in every template of its type, minus excluded words (a concept
      being forgotten is never its own anchor)."""
    exclude = {e.lower() for e in (exclude or set())}
    out = ["", *(context or [])]
    for text, kind in preserve or []:
        out += [t.format(text) for t in ANCHOR_TEMPLATES[kind]]
    for kind, words in GENERIC_WORDS.items():
        for w in words:
            if w.lower() in exclude or w.split()[-1].lower() in exclude:
                continue
            out += [t.format(w) for t in ANCHOR_TEMPLATES[kind]]
    return out
