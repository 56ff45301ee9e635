"""The shipped crowd-world: it fits the package budget beside tiny-world, loads offline with
the shared tokenizer, its report covers every concept with its split, and its model draws
held-out identities its classifier recognises."""

from __future__ import annotations

import json

import pytest
import torch

from fmn.eval.mscore.detectors import WorldDetector
from fmn.eval.mscore.prompts import concept_prompts
from fmn.model.images import generate
from fmn.model.load import embedded_path, load_pipeline
from fmn.world import ASSETS_DIR, SHARED_TOKENIZER
from fmn.world.concepts import CROWD

CROWD_DIR = embedded_path(CROWD.name)


@pytest.fixture(scope="module")
def crowd():
    torch.set_num_threads(1)
    return load_pipeline(f"embedded:{CROWD.name}")


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_all_embedded_assets_fit_40_mb() -> None:
    sizes = {p.name: _size(p) / 2**20 for p in ASSETS_DIR.iterdir() if p.is_dir()}
    assert {"tiny-world", CROWD.name, SHARED_TOKENIZER} <= set(sizes)
    assert sum(sizes.values()) <= 40, f"embedded assets: {sizes} MB, the budget is 40 MB"
    # the vocabulary lives once, beside the worlds
    assert not list(ASSETS_DIR.glob("*/tokenizer/vocab.json"))


def test_report_covers_every_concept_with_its_split_and_the_reporting_seeds() -> None:
    report = json.loads((CROWD_DIR / "world_report.json").read_text())
    scored = {c.id: c.split for c in CROWD.concepts() if c.type != "role"}
    assert {k: v["split"] for k, v in report["base_mscore"].items()} == scored
    assert report["seeds"] and min(report["seeds"]) >= 1000
    assert set(report["phrasings"]) == set(CROWD.words)
    assert report["role"]["word"] == CROWD.role.word


def test_crowd_loads_offline_with_the_shared_tokenizer(crowd) -> None:
    assert len(crowd.tokenizer) == 49408
    assert crowd.tokenizer.model_max_length == 32
    assert crowd.unet.dtype == torch.float32, "fp16 files are upcast for CPU"


def test_crowd_draws_held_out_identities_its_classifier_names(crowd) -> None:
    """Two held-out identities one attribute apart, 2 images each at 15 steps (the report
    uses 16 images at 25 steps): each image's top-1 identity is the one asked for."""
    detector = WorldDetector(CROWD_DIR / "classifier")
    names = detector.clf.names["identity"]
    assert sorted(names) == sorted(CROWD.identities)
    held = [c.id for c in CROWD.concepts() if c.type == "id" and c.split == "heldout"]
    for cid in held[:2]:
        prompts = concept_prompts(cid, "id", 2)
        images = generate(crowd, prompts, [1000, 1001], steps=15)
        top = [names[i] for i in detector.head_probs(images, "identity").argmax(1)]
        assert top == [cid, cid], f"{cid}: drawn as {top}"


def test_a_copied_world_without_the_shared_vocabulary_says_where_it_is(tmp_path) -> None:
    import shutil

    from fmn.model.load import ModelLoadError

    copy = tmp_path / "crowd"
    shutil.copytree(CROWD_DIR, copy)
    with pytest.raises(ModelLoadError, match=r"clip-tokenizer.*vocab.json and merges.txt"):
        load_pipeline(str(copy))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS_DIR / SHARED_TOKENIZER / name, copy / "tokenizer" / name)
    assert len(load_pipeline(str(copy)).tokenizer) == 49408
