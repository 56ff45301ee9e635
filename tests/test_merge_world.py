"""Three world concepts forgotten one by one, merged in closed form: all three gone, the
preserved concepts kept. The world classifier measures and feeds no loss; the forgetting
side sees the concepts' texts, the preserve list and images the base model draws."""

from __future__ import annotations

import pytest
import torch

from fmn.eval.mscore.detectors import WorldDetector
from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
from fmn.merge.fuse import MergeConfig, merge_patches
from fmn.model.load import load_pipeline
from fmn.model.patch import apply_patch, revert_patch
from fmn.train.forget import forget_concept
from fmn.train.resteer import resteer_config_for
from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
from fmn.world.concepts import get_concept

TARGETS = ["carol", "triangle", "outline"]
PRESERVED = ["alice", "eve", "circle", "star", "arrow", "flat", "dots", "shadow"]


def _mscores(pipe, detector) -> dict[str, float]:
    refs = [ConceptRef(c.id, c.type, c.text) for c in map(get_concept, TARGETS + PRESERVED)]
    rows, _ = score_concepts(pipe, refs, detector, prompts_per_concept=3, seeds=(0, 1, 2), steps=20)
    return {c: s["mscore"] for c, s in summarise(rows).items()}


@pytest.mark.slow
def test_closed_form_merge_of_three_forgets_all_and_keeps_the_rest() -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline(EMBEDDED_NAME)
    detector = WorldDetector(EMBEDDED_DIR / "classifier")
    preserve = [(c.text, c.type) for c in map(get_concept, PRESERVED)]
    patches = []
    for cid in TARGETS:
        c = get_concept(cid)
        cfg = resteer_config_for(c.type, loop=False)  # the merge under test, not the loop
        patches.append(
            forget_concept(pipe, c.id, c.type, c.text, cfg, preserve=preserve, mask="none").patch
        )
    base = _mscores(pipe, detector)
    merged = merge_patches(pipe, patches, MergeConfig(method="closed-form"), preserve=preserve)
    ratio = _ratios(pipe, detector, merged, base)
    numbers = _numbers(ratio, base, merged)
    print(numbers)
    # measured at the fixed recipe: carol 0.999 -> 0.005, triangle 0.94 -> 0.44, outline 0.94 ->
    # 0.26, preserved 1.005. The closed form gives up some forgetting to hold the preserved
    # concepts (docs/merge.md); the bound says each target lost at least half of itself
    for c in TARGETS:
        assert ratio[c] <= 0.5, f"{c} not forgotten after the merge: {numbers}"
    assert _kept(ratio) >= 0.9, f"preserved concepts damaged: {numbers}"

    # with the erase term (to each type's anchor word) the targets go further. Measured:
    # carol -> 0.000, triangle -> 0.325, outline -> 0.119, preserved 1.016
    cfg = MergeConfig(method="closed-form", preserve_weight=1.0, erase_weight=10.0)
    erased = merge_patches(pipe, patches, cfg, preserve=preserve)
    plain, ratio = ratio, _ratios(pipe, detector, erased, base)
    numbers = f"erase: {_numbers(ratio, base, erased)} | plain: {numbers}"
    print(numbers)
    for c in TARGETS:
        assert ratio[c] <= plain[c] + 0.02, f"{c} came back with the erase term: {numbers}"
    mean = {k: sum(r[c] for c in TARGETS) / len(TARGETS) for k, r in (("e", ratio), ("p", plain))}
    assert mean["e"] <= 0.75 * mean["p"], f"the erase term erased little more: {numbers}"
    assert _kept(ratio) >= 0.9, f"preserved concepts damaged by the erase term: {numbers}"


def _ratios(pipe, detector, merged, base: dict[str, float]) -> dict[str, float]:
    apply_patch(pipe, merged.patch)
    try:
        after = _mscores(pipe, detector)
    finally:
        revert_patch(pipe, merged.patch)
    return {c: after[c] / max(base[c], 1e-6) for c in base}


def _kept(ratio: dict[str, float]) -> float:
    return sum(ratio[c] for c in PRESERVED) / len(PRESERVED)


def _numbers(ratio: dict[str, float], base: dict[str, float], merged) -> str:
    return (
        "; ".join(f"{c} {base[c]:.3f} -> {base[c] * ratio[c]:.3f}" for c in TARGETS)
        + f"; preserved mean ratio {_kept(ratio):.3f} (worst "
        + ", ".join(f"{c} {ratio[c]:.2f}" for c in sorted(PRESERVED, key=ratio.get)[:2])
        + f"); edit kept by the merge {merged.kept}"
    )
