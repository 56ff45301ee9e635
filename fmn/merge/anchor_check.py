"""Does an erase anchor draw one of the concepts being erased? The base model judges itself.

The merge's erase term (fmn.merge.fuse) maps each forgotten concept onto an anchor ("a photo of
bob" -> "a photo of a person"): after the merge, the concept's prompts draw what the
anchor draws. An anchor that itself draws one of the targets puts that target back (on
the embedded world "a photo of a thing" draws circles, but "a photo of a dog" draws
squares). No detector is needed to see it: draw the anchor's images with the base model
and ask the same model which prompt explains each image best, the diffusion classifier
of Li et al. (2023): the prompt whose noise prediction errs least over fixed noise draws
and timesteps, among the empty prompt, every target and every preserved concept of the
type. Nothing here reads the world's labels or classifier.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fmn.data.prepare import generate_concept_images
from fmn.model.conditioning import cycled_prompts
from fmn.model.images import encode_images
from fmn.train.judge import judge_images

NONE = ""  # the empty prompt: the image looks like no named concept


@dataclass
class AnchorCheck:
    anchor: str
    kind: str
    images: int
    judged: dict[str, int] = field(default_factory=dict)  # best prompt's concept -> images
    drawn: dict[str, int] = field(default_factory=dict)  # the targets among them

    @property
    def share(self) -> float:
        """Share of the anchor's images the base model attributes to a target."""
        return sum(self.drawn.values()) / max(self.images, 1)

    def as_record(self) -> dict:
        return {
            "anchor": self.anchor,
            "type": self.kind,
            "images": self.images,
            "judged": self.judged,
            "drawn_as_targets": self.drawn,
            "share": round(self.share, 4),
        }


def check_anchor(
    pipe,
    anchor: str,
    kind: str,
    targets: Sequence[str],
    others: Sequence[str] = (),
    *,
    images: int = 8,
    seed: int = 0,
) -> AnchorCheck:
    """Draw `images` images of the anchor (its type's templates, fixed seeds) and count
    those the base model explains best by a target's prompt. `targets`, `others`: texts of
    the concepts of the same type being erased, and kept (they compete for the images)."""
    pixels = generate_concept_images(pipe, anchor, kind, images, seed)
    names = [NONE, *targets, *[o for o in others if o not in targets]]
    prompts = [[""] * images, *(cycled_prompts(text, kind, images) for text in names[1:])]
    judged = Counter(judge_images(pipe, encode_images(pipe, pixels), names, prompts, seed=seed))
    drawn = {t: judged[t] for t in targets if judged[t]}
    return AnchorCheck(anchor, kind, images, dict(judged), drawn)


def choose_anchor(
    pipe,
    kind: str,
    targets: Sequence[str],
    others: Sequence[str],
    candidates: Sequence[str],
    *,
    images: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, list[AnchorCheck]]:
    """The candidate whose images the base model least attributes to a target (the first
    on ties: list the preferred anchor first), and every candidate's check."""
    words = [c for c in candidates if c.lower() not in {t.lower() for t in targets}]
    if not words:
        raise ValueError(f"no anchor candidate for type {kind!r} is left once targets are removed")
    checks = []
    for k, word in enumerate(words):
        checks.append(check_anchor(pipe, word, kind, targets, others, images=images))
        if progress:
            progress(k + 1, len(words))
    best = min(checks, key=lambda c: sum(c.drawn.values()))
    return best.anchor, checks
