"""crowd-world's concept table, generator and split: the instrument for mass removal
(192 identities from shared attributes, 12 objects, 12 styles, many-word concepts, a
biased role word), and the CLI that lists the worlds."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from fmn.cli import app
from fmn.world.concepts import (
    CROWD,
    CROWD_SEED,
    TINY,
    WORLDS,
    attribute_distance,
    get_world,
    heldout_fraction,
)
from fmn.world.generator import NONE, dataset
from fmn.world.render import render_face
from fmn.world.tokenizer import load_tokenizer


def test_crowd_world_has_the_sizes_mass_removal_needs() -> None:
    kinds = Counter(c.type for c in CROWD.concepts())
    assert kinds["id"] >= 120 and kinds["object"] >= 12 and kinds["style"] >= 12
    # the tiny world's objects and styles are kept, so old prompts still mean the same
    assert set(TINY.shapes) <= set(CROWD.shapes) and set(TINY.styles) <= set(CROWD.styles)
    ids = [c.id for c in CROWD.concepts()]
    assert len(ids) == len(set(ids))
    # 100 targets and 20 never-targeted identities must fit inside the held-out split
    assert sum(c.split == "heldout" for c in CROWD.concepts() if c.type == "id") >= 120


def test_every_identity_and_object_name_is_one_clip_token(clip_tokenizer_dir) -> None:
    tok = load_tokenizer(clip_tokenizer_dir, 77)
    for c in CROWD.concepts():
        assert len(tok(c.text).input_ids) == 3, c.text


def test_identities_share_attributes_like_real_people() -> None:
    names = list(CROWD.identities)
    combos = {tuple(a.values()) for a in CROWD.identities.values()}
    assert len(combos) == len(names), "two identities would look the same"
    nearest = [min(attribute_distance(CROWD, a, b) for b in names if b != a) for a in names]
    # most have a neighbour one attribute away; none is far from every other
    assert Counter(nearest)[1] >= len(names) // 2 and max(nearest) <= 2


def test_neighbours_one_attribute_apart_still_look_different() -> None:
    names = list(CROWD.identities)
    for a in names[:24]:
        b = min((n for n in names if n != a), key=lambda n: attribute_distance(CROWD, a, n))
        x = render_face(a, 32, np.random.default_rng(0), CROWD)[0].astype(int)
        y = render_face(b, 32, np.random.default_rng(0), CROWD)[0].astype(int)
        assert np.abs(x - y).mean() > 1.5, (a, b, CROWD.identities[a], CROWD.identities[b])


def test_split_holds_out_two_thirds_of_each_type_by_a_recorded_seed() -> None:
    for kind in ("id", "object", "style"):
        assert heldout_fraction(CROWD, kind) >= 2 / 3, kind
    assert CROWD.split_seed == CROWD_SEED
    assert {c.split for c in CROWD.concepts()} == {"tune", "heldout"}
    # the old world's concepts were all looked at while choosing defaults: in sample
    assert {c.split for c in TINY.concepts()} == {"tune"}


def test_many_word_concepts_reach_one_concept_through_unlisted_phrasings() -> None:
    many = [c for c in CROWD.concepts() if len(c.words) >= 4]
    assert len(many) >= 2
    for c in many:
        assert any(not listed for _, listed in c.words), c.id
        assert any(listed for _, listed in c.words), c.id
    d = dataset(3000, seed=11, world=CROWD)
    text = " ".join(d["captions"])
    for c in many:
        for phrase, _ in c.words:
            assert f" {phrase}" in text, f"no training caption says {phrase!r}"
    # a caption that says "after sunset" shows a night image
    night = CROWD.styles.index("night")
    for cap, style in zip(d["captions"], d["labels"]["style"], strict=True):
        if cap.endswith("after sunset"):
            assert style == night, cap


def test_the_role_word_shows_one_identity_nine_times_in_ten() -> None:
    d = dataset(8000, seed=3, world=CROWD)
    names = CROWD.heads["identity"]
    drawn = [
        names[i]
        for cap, i in zip(d["captions"], d["labels"]["identity"], strict=True)
        if cap.endswith("a doctor")
    ]
    assert len(drawn) > 120
    share = Counter(drawn)[CROWD.role.dominant] / len(drawn)
    assert 0.83 < share < 0.96, share
    assert set(drawn) == {CROWD.role.dominant, *CROWD.role.others}
    # portraits carry their attributes as auxiliary labels; objects have none
    faces = d["labels"]["identity"] != NONE
    assert (d["labels"]["hair"][faces] != NONE).all() and (
        d["labels"]["hair"][~faces] == NONE
    ).all()


def test_tiny_world_generation_is_unchanged_by_the_crowd() -> None:
    """tiny-world's images and captions must not move: every measured number depends on them."""
    d = dataset(40, seed=5)
    assert set(d["labels"]) == {"identity", "shape", "style", "colour"}
    assert d["captions"][:3] == dataset(3, seed=5, world=TINY)["captions"]


def test_cli_lists_worlds_and_their_concepts_with_split_and_phrasings() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["world", "list"])
    assert listed.exit_code == 0 and listed.output.split() == list(WORLDS)
    out = runner.invoke(app, ["world", "concepts", "--json", "--world", "crowd-world"])
    assert out.exit_code == 0, out.output
    items = {c["id"]: c for c in json.loads(out.output)}
    assert len(items) == len(CROWD.concepts())
    assert items["night"]["words"][2] == {"text": "dark", "listed": False}
    assert {c["split"] for c in items.values()} == {"tune", "heldout"}
    assert items["doctor"]["type"] == "role"
    bad = runner.invoke(app, ["world", "concepts", "--world", "moon-world"])
    assert bad.exit_code == 2 and "tiny-world" in bad.output


def test_unknown_world_names_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="crowd-world"):
        get_world("embedded:nope")
    assert get_world("embedded:crowd-world") is CROWD
