"""M-Score prompt sets: fixed, deterministic, enough per type; user prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmn.mscore.prompts import (
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
    templates = read_prompt_file(path)
    assert fill_templates(templates, "carol") == ["a photo of carol", "carol on a beach"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a photo of {}\na photo of nobody\n", r"prompts\.txt:2: no '\{\}'"),
        ("# only a comment\n\n", "no prompts"),
    ],
)
def test_bad_prompt_file_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(PromptFileError, match=message):
        read_prompt_file(path)
    with pytest.raises(PromptFileError, match="cannot read"):
        read_prompt_file(tmp_path / "missing.txt")
