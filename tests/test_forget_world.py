"""Forgetting for real on the embedded world: the target's M-Score falls, the others hold.

The world classifier measures here and feeds no loss; the re-steering side sees the
concept's text and images the base model generates, nothing else.
"""

from __future__ import annotations

import pytest
import torch

from fmn.eval.mscore.detectors import WorldDetector
from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
from fmn.model.load import load_pipeline
from fmn.model.patch import apply_patch, revert_patch
from fmn.train.forget import forget_concept
from fmn.train.resteer import ResteerConfig
from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
from fmn.world.concepts import world_concepts


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_pipeline(EMBEDDED_NAME), WorldDetector(EMBEDDED_DIR / "classifier")


def _scores(pipe, detector) -> dict[str, float]:
    refs = [ConceptRef(c.id, c.type, c.text) for c in world_concepts()]
    rows, _ = score_concepts(pipe, refs, detector, prompts_per_concept=2, seeds=(0, 1, 2), steps=20)
    return {c: s["mscore"] for c, s in summarise(rows).items()}


@pytest.mark.slow
def test_forget_an_identity_keeps_the_others(world) -> None:
    pipe, detector = world
    base = _scores(pipe, detector)
    res = forget_concept(pipe, "carol", "id", "carol", ResteerConfig(), generate=16, mask="none")
    apply_patch(pipe, res.patch)
    try:
        after = _scores(pipe, detector)
    finally:
        revert_patch(pipe, res.patch)
    ratios = {c: after[c] / base[c] for c in base}
    others = {c: r for c, r in ratios.items() if c != "carol"}
    mean_others = sum(others.values()) / len(others)
    worst = min(others, key=others.get)
    numbers = (
        f"carol {base['carol']:.3f} -> {after['carol']:.3f} (ratio {ratios['carol']:.3f}); "
        f"others mean ratio {mean_others:.3f}, worst {worst} {others[worst]:.3f}; "
        f"attention on 'carol' {res.resteer.attention_before:.4f} -> "
        f"{res.resteer.attention_after:.4f}"
    )
    print(numbers)  # shown with pytest -rP: the measured numbers, pass or fail
    assert ratios["carol"] <= 0.2, f"target not forgotten: {numbers}"
    assert mean_others >= 0.9, f"collateral damage: {numbers}"
    assert res.resteer.attention_after < 0.5 * res.resteer.attention_before, numbers
