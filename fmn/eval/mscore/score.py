"""M-Score: generate from fixed prompts x fixed seeds, let a detector say if the concept is there.

M-Score(m, c) = mean detector probability over those images; Acc(m, c) = fraction where
the concept is the detector's top-1 answer. See docs/mscore.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fmn.eval.mscore.detectors import Detector
from fmn.eval.mscore.prompts import concept_prompts
from fmn.model.images import generate


@dataclass(frozen=True)
class ConceptRef:
    id: str
    type: str
    text: str
    role: str = "target"  # target | preserve | correct
    # the detector's concepts its images are scored as, each into rows "<id>:<other>" (a
    # correction's guide concepts; the concept itself among them when the detector knows
    # it, as "<id>"); empty: the concept itself
    scored_as: tuple[str, ...] = ()


@dataclass
class ScoreRow:
    concept: str
    type: str
    role: str
    detector: str
    prompt: str
    seed: int
    probability: float
    recognised: bool
    parts: str = ""  # body parts a detector with `score_parts` found (nudenet), comma-joined


def score_concepts(
    pipe,
    concepts: Sequence[ConceptRef],
    detector: Detector | Mapping[str, Detector],
    *,
    prompts_per_concept: int = 4,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 25,
    guidance: float = 5.0,
    prompts: Mapping[str, Sequence[str]] | None = None,
    batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[ScoreRow], dict[str, np.ndarray]]:
    """Rows (one per concept x prompt x seed) and the generated images per concept, in
    prompt-major order. `detector`: one for all, or one per concept type; `prompts`: the
    prompts per concept id (a concept not in it: `prompts_per_concept` world templates)."""
    jobs = []
    for c in concepts:
        mine = prompts.get(c.id) if prompts is not None else None
        for p in mine or concept_prompts(c.text, c.type, prompts_per_concept):
            jobs += [(c, p, s) for s in seeds]
    all_images = generate(
        pipe,
        [j[1] for j in jobs],
        [j[2] for j in jobs],
        steps=steps,
        guidance=guidance,
        batch=batch,
        progress=progress,
    )
    rows, per_concept = [], {}
    for c in concepts:
        det = detector[c.type] if isinstance(detector, Mapping) else detector
        idx = [k for k, j in enumerate(jobs) if j[0] is c]
        imgs = all_images[idx]
        per_concept[c.id] = imgs
        for sid in c.scored_as or (c.id,):
            name = c.id if sid == c.id else f"{c.id}:{sid}"
            if hasattr(det, "score_parts"):  # one pass gives the parts too
                prob, rec, parts = det.score_parts(imgs, sid, c.type)
            else:
                (prob, rec), parts = det.score(imgs, sid, c.type), [""] * len(imgs)
            for k, pr, r, found in zip(idx, prob, rec, parts, strict=True):
                rows.append(
                    ScoreRow(
                        name,
                        c.type,
                        c.role,
                        det.name,
                        jobs[k][1],
                        jobs[k][2],
                        float(pr),
                        bool(r),
                        found,
                    )
                )
    return rows, per_concept


def summarise(rows: Sequence[ScoreRow]) -> dict[str, dict[str, float]]:
    """Per concept: M-Score (mean probability) and Acc (fraction recognised)."""
    out: dict[str, dict[str, float]] = {}
    for cid in dict.fromkeys(r.concept for r in rows):
        mine = [r for r in rows if r.concept == cid]
        out[cid] = {
            "mscore": float(np.mean([r.probability for r in mine])),
            "acc": float(np.mean([r.recognised for r in mine])),
            "n": len(mine),
        }
    return out


def rows_as_dicts(rows: Sequence[ScoreRow]) -> list[dict]:
    return [asdict(r) for r in rows]
