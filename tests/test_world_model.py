"""The shipped embedded world: it loads offline, its classifier measures, its model draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmn.eval.mscore.detectors import WorldDetector
from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
from fmn.model.load import fingerprint, load_pipeline, model_family
from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
from fmn.world.concepts import HEADS, world_concepts
from fmn.world.evaluate import classifier_accuracy
from fmn.world.generator import dataset


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_pipeline(EMBEDDED_NAME)


@pytest.fixture(scope="module")
def detector():
    return WorldDetector(EMBEDDED_DIR / "classifier")


def test_embedded_world_is_small_and_complete() -> None:
    size = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert size < 30 * 2**20, f"embedded world is {size / 2**20:.1f} MB, the budget is 30 MB"
    report = json.loads((EMBEDDED_DIR / "world_report.json").read_text())
    assert set(report["base_mscore"]) == {c.id for c in world_concepts()}


def test_embedded_world_loads_offline_as_sd1(world) -> None:
    assert model_family(world) == "sd1"
    assert world.unet.dtype == torch.float32, "fp16 files are upcast for CPU"
    assert world.scheduler.config.steps_offset == 1
    assert len(world.tokenizer) == 49408
    assert fingerprint(world) == fingerprint(load_pipeline(EMBEDDED_NAME))


def test_classifier_is_accurate_on_held_out_images(detector) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(EMBEDDED_DIR / "vae", torch_dtype=torch.float32)
    acc = classifier_accuracy(detector, vae, n=600)
    low = {f"{v}/{h}": a for v, row in acc.items() for h, a in row.items() if a < 0.95}
    assert not low, f"classifier accuracy below 95%: {low} (all: {acc})"


def test_classifier_says_none_for_portraits_shape(detector) -> None:
    d = dataset(200, seed=4242)
    portraits = d["labels"]["identity"] != -1
    p = detector.head_probs(d["images"][portraits], "shape")
    assert p.sum(1).mean() < 0.1, "a portrait has no shape: the 'none' class should win"


def test_base_model_draws_the_concept_it_is_asked_for(world, detector) -> None:
    """Fewer images than the shipped report (2 prompts x 2 seeds, 15 steps) to stay quick."""
    concepts = [ConceptRef(c.id, c.type, c.text) for c in world_concepts()]
    rows, images = score_concepts(
        world, concepts, detector, prompts_per_concept=2, seeds=(0, 1), steps=15
    )
    summary = summarise(rows)
    good = [c for c, s in summary.items() if s["mscore"] >= 0.6]
    table = {c: round(s["mscore"], 2) for c, s in summary.items()}
    assert len(good) >= 0.8 * len(concepts), (
        f"M-Score >= 0.6 for only {len(good)}/{len(concepts)}: {table}"
    )
    assert all(img.shape == (32, 32, 3) and img.std() > 5 for img in images["star"])
    assert set(HEADS["identity"]) <= set(summary)
    assert np.isfinite([s["mscore"] for s in summary.values()]).all()


def test_world_sample_cli_writes_a_png(tmp_path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from fmn.cli import app

    out = tmp_path / "star.png"
    args = [
        "world",
        "sample",
        "a photo of a red star",
        "--out",
        str(out),
        "--n",
        "2",
        "--steps",
        "5",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.width > 2 * 32 * 4 and im.height >= 32 * 4
