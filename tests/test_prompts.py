"""M-Score prompt sets: fixed, deterministic, enough per type; user prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmn.eval.mscore.prompts import (
    GENERAL,
    WORLD,
    PromptFileError,
    concept_prompts,
    fill_templates,
    read_prompt_file,
)


def test_general_set_has_ten_templates_per_type_each_naming_the_concept_once() -> None:
    assert set(GENERAL.templates) == {"id", "object", "style", "nsfw"}
    for kind, templates in GENERAL.templates.items():
        assert len(set(templates)) >= 10, kind
        assert all(t.count("{}") == 1 for t in templates), kind
    for templates in WORLD.templates.values():
        assert all(t.count("{}") == 1 for t in templates)


def test_prompts_are_fixed_by_seed_and_shared_across_concepts() -> None:
    a = concept_prompts("van gogh", "style", 12, seed=0, prompt_set="general")
    assert a == concept_prompts("van gogh", "style", 12, seed=0, prompt_set="general")
    assert a != concept_prompts("van gogh", "style", 12, seed=1, prompt_set="general")
    assert len(set(a)) == 12 and all("van gogh" in p for p in a)
    # every concept of a type gets the same nuisance words: comparisons stay fair
    b = concept_prompts("monet", "style", 12, seed=0, prompt_set="general")
    assert [p.replace("monet", "X") for p in b] == [p.replace("van gogh", "X") for p in a]
    assert concept_prompts("umbrella", "object", 1, prompt_set="general") == [
        "a photo of an umbrella"
    ]


def test_world_prompts_keep_the_measured_order() -> None:
    # the world's numbers in docs were measured with these four; they must not move
    assert concept_prompts("star", "object", 4) == [
        "a photo of a star",
        "a photo of a green star",
        "a picture of a star in the style of flat",
        "an image of a purple star in the style of gradient",
    ]
    with pytest.raises(KeyError, match="no 'nsfw' templates"):
        concept_prompts("nudity", "nsfw", 4)


def test_prompt_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# mine\na photo of {}\n\n  {} on a beach  \n")
    prompts = read_prompt_file(path)
    # no sections: every type gets every line, as before sections existed
    for kind in ("id", "object", "style", "nsfw"):
        templates = prompts.templates_for(kind)
        assert fill_templates(templates, "carol") == ["a photo of carol", "carol on a beach"]


SECTIONED = """# every type
a photo of {}
[style]
a painting in the style of {}
[ Object ]
a {} on a table
[{} at night]
"""


def test_prompt_file_sections_give_each_type_its_own_prompts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(SECTIONED)
    prompts = read_prompt_file(path)
    assert prompts.templates_for("style") == ["a photo of {}", "a painting in the style of {}"]
    # a section name is a concept type in any case; a bracketed line with {} is a template
    assert prompts.templates_for("object") == ["a photo of {}", "a {} on a table", "[{} at night]"]
    assert prompts.templates_for("id") == ["a photo of {}"]  # no section: the general lines


def test_nsfw_prompts_may_reach_the_concept_without_naming_it(tmp_path: Path) -> None:
    """I2P's prompts never say "nudity": in [nsfw] a whole prompt is used as written, and
    the audit draws every one of them for the concept."""
    from fmn.eval.audit import _plan
    from fmn.manifest import parse_manifest
    from fmn.world import EMBEDDED_NAME

    path = tmp_path / "i2p.txt"
    path.write_text("[nsfw]\na renaissance bath scene, oil painting\n{} on a beach\n[id]\n{}\n")
    concepts = [{"id": "nudity", "type": "nsfw", "words": ["nudity", "naked"]}]
    doc = {"name": "p", "base_model": EMBEDDED_NAME, "concepts": concepts}
    plan = _plan(parse_manifest(doc, base_dir=tmp_path), path, None)
    assert plan.prompts["nudity"] == ["a renaissance bath scene, oil painting", "naked on a beach"]
    path.write_text("[id]\na photo of nobody\n")
    with pytest.raises(PromptFileError, match=r"i2p\.txt:2: no '\{\}'"):
        read_prompt_file(path)


def test_a_type_without_prompts_is_an_error_naming_file_and_type(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("[style]\n{} art\n")
    prompts = read_prompt_file(path)
    assert prompts.templates_for("style") == ["{} art"]
    with pytest.raises(
        PromptFileError, match=r"prompts\.txt: no prompts for 'id' concepts.*\[id\]"
    ):
        prompts.templates_for("id")


def test_audit_plan_fills_each_concept_from_its_type(tmp_path: Path) -> None:
    from fmn.eval.audit import _plan
    from fmn.manifest import parse_manifest
    from fmn.world import EMBEDDED_NAME

    path = tmp_path / "prompts.txt"
    path.write_text(SECTIONED)
    concepts = [{"id": "carol", "type": "id"}, {"id": "dots", "type": "style"}]
    doc = {"name": "p", "base_model": EMBEDDED_NAME, "concepts": concepts}
    plan = _plan(parse_manifest(doc, base_dir=tmp_path), path, None)
    assert plan.prompts == {
        "carol": ["a photo of carol"],
        "dots": ["a photo of dots", "a painting in the style of dots"],
    }
    (tmp_path / "style-only.txt").write_text("[style]\n{} art\n")
    with pytest.raises(PromptFileError, match="no prompts for 'id' concepts"):
        _plan(parse_manifest(doc, base_dir=tmp_path), tmp_path / "style-only.txt", None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a photo of {}\na photo of nobody\n", r"prompts\.txt:2: no '\{\}'"),
        ("# only a comment\n\n", "no prompts"),
        (
            "a photo of {}\n\n[styles]\n{} art\n",
            r"prompts\.txt:3: unknown section '\[styles\]'.*did you mean \[style\]",
        ),
        ("[id]\n[style]\n{} art\n", r"prompts\.txt:1: section \[id\] has no prompts"),
        ("[id]\n{}\n[id]\n{} again\n", r"prompts\.txt:3: section \[id\] again"),
    ],
)
def test_bad_prompt_file_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(PromptFileError, match=message):
        read_prompt_file(path)
    with pytest.raises(PromptFileError, match="cannot read"):
        read_prompt_file(tmp_path / "missing.txt")
