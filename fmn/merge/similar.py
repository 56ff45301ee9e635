"""Words nobody listed that reach a concept: the vocabulary words the base model itself
draws as the concept. A concept listed with several trigger words (`words:`) stands for
whatever word reaches it; its gate also fires on these (fmn.merge.gates).

For each of the `CANDIDATES` vocabulary words whose states come nearest the concept's gate
prototypes, the base model's diffusion classifier (fmn.train.judge.prompt_errors, Li et al.
2023) compares how well the word's prompt explains the concept's own images (drawn by the
base model from its listed words) against the listed word's prompt and the type's anchor
("a photo of a thing"): share = [err(anchor) - err(word)] / [err(anchor) - err(listed)],
1 where the word explains them as well as the listed words do, 0 no better than the anchor.
A word at `SIMILAR_SHARE` or more is taken. Reads no detector and no label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fmn.data.anchors import ERASE_ANCHORS
from fmn.model.conditioning import CONCEPT_TEMPLATES, concept_prompts

# Chosen on tune concepts (4 identities, 4 objects, 4 styles; docs/mass.md "Words nobody
# listed"): none of their 32 candidate words reached 0.41, and no tune concept has a word
# that should be taken. The threshold was fixed before any held-out concept was looked at.
SIMILAR_SHARE = 0.6
CANDIDATES = 32  # nearest vocabulary words judged per concept
IMAGES = 8  # the concept's images the judge reads
SEED = 100
# A concept listed with at least this many phrasings is widened by default: its manifest
# says it is reached by several words (`words:`), so by words nobody listed, too.
WIDEN_MIN_WORDS = 2


def widened(concepts: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
    """The ids among (id, type, phrasings) whose gates take the words similar to them."""
    return [cid for cid, _, words in concepts if len(words) >= WIDEN_MIN_WORDS]


def similar_words(
    pipe,
    kind: str,
    words: Sequence[str],
    candidates: Sequence[str],
    *,
    anchor: str | None = None,
    images: int = IMAGES,
    share: float = SIMILAR_SHARE,
    seed: int = SEED,
) -> list[tuple[str, float]]:
    """[(word, share)] of the `candidates` the base model `pipe` draws like the concept
    of `words` (share >= `share`), best first. `pipe` must be the base model."""
    from fmn.model.images import encode_images, generate
    from fmn.train.judge import prompt_errors

    listed = concept_prompts(list(words), kind)  # template-major: the images' own prompts
    drawn = [listed[i % len(listed)] for i in range(images)]
    template = [CONCEPT_TEMPLATES[kind][(i % len(listed)) // len(words)] for i in range(images)]
    latents = encode_images(pipe, generate(pipe, drawn, [seed + i for i in range(images)]))
    anchor = anchor or ERASE_ANCHORS[kind]
    sets = [drawn, [t.format(anchor) for t in template]]
    sets += [[t.format(w) for t in template] for w in candidates]
    err = prompt_errors(pipe, latents, sets, seed=seed)
    gain = (err[:, 1] - err[:, 0]).mean()
    if not bool(gain > 0):  # the anchor explains the concept's images as well: no measure
        return []
    shares = ((err[:, 1:2] - err[:, 2:]).mean(0) / gain).tolist()
    found = [(w, s) for w, s in zip(candidates, shares, strict=True) if s >= share]
    return sorted(found, key=lambda x: -x[1])


def nearest_words(
    words: Sequence[str],
    states: torch.Tensor,
    owner: torch.Tensor,
    prototypes: torch.Tensor,
    skip: Sequence[str],
    k: int = CANDIDATES,
) -> list[str]:
    """The k of `words` whose states (whitened, [N, D]; owner[i]: the word of state i, -1
    for none) come nearest `prototypes`, but those in `skip`."""
    d = torch.cdist(states, prototypes).amin(1)
    best = torch.full((len(words),), float("inf"))
    keep = owner >= 0
    best.scatter_reduce_(0, owner[keep], d[keep], reduce="amin")
    index = {w: i for i, w in enumerate(words)}
    for w in skip:
        if w.lower() in index:
            best[index[w.lower()]] = float("inf")
    order = best.argsort()[:k]
    return [words[i] for i in order.tolist() if best[i] < float("inf")]
