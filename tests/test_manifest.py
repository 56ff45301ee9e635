"""Manifest loading: every bad manifest fails before any work, naming the field and a fix;
good manifests come back with defaults applied and paths resolved."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml

from fmn.manifest import (
    SCHEMA_COMMAND,
    InvertOptions,
    ManifestError,
    Problem,
    ResteerOptions,
    load_manifest,
    manifest_schema,
    write_schema,
)
from fmn.world.concepts import get_world

ROOT = Path(__file__).resolve().parents[1]
BASE = "name: t\nconcepts:\n  - {id: circle, type: object}\n"


def write(folder: Path, text: str, name: str = "m.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value.problems


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """tmp_path with an image folder `faces/`, and `empty/` that holds no image."""
    (tmp_path / "faces").mkdir()
    for name in ("a.png", "b.JPG"):  # real images: loading reads every image's header
        tiny_image(tmp_path / "faces" / name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    return tmp_path


def tiny_image(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4), "white").save(path, format="JPEG" if path.suffix == ".JPG" else "PNG")


BAD = [
    ("malformed-yaml", "name: t\nconcepts: [\n  - {id: a\n", "(file)", "invalid YAML at line 3"),
    ("duplicate-yaml-key", BASE + "name: u\n", "(file)", "duplicate key 'name'"),
    ("empty-file", "", "(file)", "the file is empty"),
    ("top-level-list", "- name: t\n", "(file)", "must be a mapping of keys, got a list"),
    ("unknown-top-level-key", BASE + "conceptz: []\n", "conceptz", "unknown key 'conceptz'"),
    (
        "unknown-nested-key",
        BASE + "defaults:\n  resteer: {stepz: 3}\n",
        "defaults.resteer.stepz",
        "unknown key 'stepz'",
    ),
    (
        "unknown-override-key",
        "name: t\nconcepts:\n  - {id: a, type: id, invert: {enable: true}}\n",
        "concepts.0.invert.enable",
        "unknown key 'enable'",
    ),
    ("missing-name", "concepts:\n  - {id: a, type: id}\n", "name", "required key is missing"),
    ("empty-concepts", "name: t\nconcepts: []\n", "concepts", "must not be empty"),
    (
        "duplicate-id",
        BASE + "  - {id: star, type: object}\n  - {id: circle, type: object}\n",
        "concepts.2.id",
        "duplicate id 'circle' (first at concepts.0.id)",
    ),
    (
        "duplicate-id-in-preserve",
        BASE + "preserve:\n  - {id: star, type: object}\n  - {id: circle, type: object}\n",
        "preserve.1.id",
        "duplicate id 'circle' (first at concepts.0.id)",
    ),
    (
        "id-escapes-folder",
        "name: t\nconcepts:\n  - {id: ../etc, type: id}\n",
        "concepts.0.id",
        "becomes a file name",
    ),
    ("id-with-slash", "name: t\nconcepts:\n  - {id: a/b, type: id}\n", "concepts.0.id", "'/'"),
    ("id-dot", "name: t\nconcepts:\n  - {id: ., type: id}\n", "concepts.0.id", "'.'"),
    (
        "uppercase-id",
        "name: t\nconcepts:\n  - {id: Carol, type: id}\n",
        "concepts.0.id",
        "uppercase letters are not allowed",
    ),
    (
        "id-with-space",
        "name: t\nconcepts:\n  - {id: van gogh, type: style}\n",
        "concepts.0.id",
        "spaces are not allowed",
    ),
    ("id-not-a-string", "name: t\nconcepts:\n  - {id: 12, type: id}\n", "concepts.0.id", "12"),
    ("bad-name", "name: My Build\nconcepts:\n  - {id: a, type: id}\n", "name", "invalid slug"),
    (
        "unknown-type",
        "name: t\nconcepts:\n  - {id: a, type: animal}\n",
        "concepts.0.type",
        "unknown value 'animal'",
    ),
    (
        "negative-steps",
        BASE + "defaults:\n  resteer: {steps: -5}\n",
        "defaults.resteer.steps",
        "greater than or equal to 1, got -5",
    ),
    (
        "nan-lr",
        BASE + "defaults:\n  resteer: {lr: .nan}\n",
        "defaults.resteer.lr",
        "must be a finite number",
    ),
    (
        "inf-lr-override",
        "name: t\nconcepts:\n  - {id: a, type: id, invert: {lr: .inf}}\n",
        "concepts.0.invert.lr",
        "must be a finite number",
    ),
    (
        "zero-lr",
        BASE + "defaults:\n  invert: {lr: 0}\n",
        "defaults.invert.lr",
        "greater than 0",
    ),
    (
        "zero-generate",
        "name: t\nconcepts:\n  - {id: a, type: id, images: {generate: 0}}\n",
        "concepts.0.images.generate",
        "greater than or equal to 1",
    ),
    (
        "too-many-generate",
        "name: t\nconcepts:\n  - {id: a, type: id, images: {generate: 1025}}\n",
        "concepts.0.images.generate",
        "less than or equal to 1024",
    ),
    (
        "images-wrong-kind",
        "name: t\nconcepts:\n  - {id: a, type: id, images: 16}\n",
        "concepts.0.images",
        "folder path or {generate: N}",
    ),
    (
        "missing-images-folder",
        "name: t\nconcepts:\n  - {id: a, type: id, images: nope}\n",
        "concepts.0.images",
        "nope does not exist",
    ),
    (
        "empty-images-folder",
        "name: t\nconcepts:\n  - {id: a, type: id, images: empty}\n",
        "concepts.0.images",
        "has no .jpg/.jpeg/.png/.webp files",
    ),
    (
        "missing-mask-folder",
        "name: t\nconcepts:\n  - {id: a, type: id, images: faces, mask: {folder: nope}}\n",
        "concepts.0.mask.folder",
        "nope does not exist",
    ),
    (
        "unknown-mask",
        "name: t\nconcepts:\n  - {id: a, type: id, mask: eyes}\n",
        "concepts.0.mask",
        "unknown value 'eyes'",
    ),
    (
        "mask-set-twice",
        "name: t\nconcepts:\n  - {id: a, type: id, mask: face, resteer: {mask: none}}\n",
        "concepts.0.mask",
        "set twice",
    ),
    (
        "gate-out-of-range",
        BASE + "evaluate:\n  gates: {target_mscore_max: 1.5}\n",
        "evaluate.gates.target_mscore_max",
        "less than or equal to 1",
    ),
    (
        "empty-seeds",
        BASE + "evaluate: {seeds: []}\n",
        "evaluate.seeds",
        "must not be empty",
    ),
    (
        "unknown-detector",
        BASE + "evaluate:\n  detectors: {style: vgg}\n",
        "evaluate.detectors.style",
        "unknown value 'vgg'",
    ),
    ("unknown-merge-method", BASE + "merge: {method: avg}\n", "merge.method", "'avg'"),
    (
        "anchor-for-unknown-concept",
        BASE + "merge: {erase_weight: 10, anchors: {circel: a shape}}\n",
        "merge.anchors.circel",
        "not a concept to forget",
    ),
    (
        "weight-for-unknown-concept",
        BASE + "merge: {method: sum, weights: {circel: 2.0}}\n",
        "merge.weights.circel",
        "not a concept to forget",
    ),
    ("unknown-on-error", BASE + "on_error: retry\n", "on_error", "unknown value 'retry'"),
    (
        "recovery-gate-without-the-attack",
        BASE + "evaluate:\n  gates: {recovery_max: 0.5}\n",
        "evaluate",
        "recovery_max is set but no attack runs",
    ),
    (
        "attack-gate-without-its-attack",
        BASE + "evaluate:\n  recovery: true\n  gates: {attack_max: {prompt: 0.2}}\n",
        "evaluate",
        "attack_max.prompt is set but that attack does not run",
    ),
    (
        "attack-gate-for-unknown-attack",
        BASE + "evaluate:\n  recovery: true\n  gates: {attack_max: {inversion: 0.2}}\n",
        "evaluate.gates.attack_max.inversion",
        "unknown value 'inversion'",
    ),
    (
        "phrasings-for-unknown-concept",
        BASE + "evaluate:\n  phrasings: {circel: [a ring]}\n",
        "evaluate.phrasings.circel",
        "not a concept to forget",
    ),
]


@pytest.mark.parametrize(("text", "loc", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_manifest_names_field_and_problem(
    folders: Path, text: str, loc: str, fragment: str
) -> None:
    found = problems(write(folders, text))
    assert any(p.loc == loc and fragment in p.msg for p in found), found
    assert all(p.hint for p in found if p.loc == loc), found


def test_hints_say_what_to_do(tmp_path: Path) -> None:
    text = (
        "name: t\nconcepts:\n  - {id: Van Gogh, type: painter}\ndefaults:\n  resteer: {stepz: 3}\n"
    )
    hints = {p.loc: p.hint for p in problems(write(tmp_path, text))}
    assert "(e.g. 'van-gogh')" in hints["concepts.0.id"]
    assert "use lowercase letters, digits and '-'" in hints["concepts.0.id"]
    assert "'id', 'object', 'style' or 'nsfw'" in hints["concepts.0.type"]
    assert hints["defaults.resteer.stepz"].startswith("did you mean 'steps'?")
    assert (
        "valid keys here are: steps, lr, preserve_weight, params, positions, mask, batch, seed"
        in (hints["defaults.resteer.stepz"])
    )


def test_missing_folder_error_names_the_resolved_path(tmp_path: Path) -> None:
    path = write(tmp_path / "manifests", BASE.replace("object}", "object, images: ../data/x}"))
    (found,) = problems(path)
    assert found.loc == "concepts.0.images"
    assert str(tmp_path / "data" / "x") in found.msg


def test_every_problem_is_reported_at_once_one_line_each(tmp_path: Path) -> None:
    text = "name: t\nconcepts:\n  - {id: A, type: x}\non_error: maybe\n"
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == path
    assert [p.loc for p in err.problems] == ["concepts.0.id", "concepts.0.type", "on_error"]
    lines = str(err).splitlines()
    assert len(lines) == 3
    assert (
        lines[2]
        == f"{path}: on_error: unknown value 'maybe' (hint: allowed values: 'fail' or 'skip')"
    )


def test_manifest_error_survives_pickling(tmp_path: Path) -> None:
    """Errors cross process boundaries (task runners) intact."""
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, "- a\n"))
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.path, copy.problems, str(copy)) == (
        info.value.path,
        info.value.problems,
        str(info.value),
    )


def test_missing_file(tmp_path: Path) -> None:
    (found,) = problems(tmp_path / "nope.yaml")
    assert (found.loc, found.msg) == ("(file)", "file not found")


def test_defaults_applied(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, BASE))
    assert m.base_model == "embedded:tiny-world"
    assert m.on_error == "fail"
    assert m.merge.method == "closed-form"
    assert m.merge.weights == {}
    assert m.preserve == []
    ev = m.evaluate
    assert (ev.prompts_per_concept, ev.seeds, ev.steps, ev.guidance) == (10, [0, 1, 2, 3], 25, 5.0)
    assert ev.detectors.model_dump() == {
        "id": "world",
        "object": "world",
        "style": "world",
        "nsfw": "nudenet",
    }
    assert (ev.gates.target_mscore_max, ev.gates.preserve_ratio_min) == (0.1, 0.9)
    (c,) = m.resolved_concepts()
    assert (c.images, c.generate, c.mask) == (None, 16, "auto")
    assert c.invert == InvertOptions(enabled=False, tokens=4, steps=300, lr=1e-3, init_words=None)
    assert c.resteer == ResteerOptions(
        steps=35,
        lr=3e-3,
        preserve_weight=None,
        params="to_kv",
        positions=None,
        mask="auto",
        batch=4,
        seed=0,
    )


def test_text_defaults_to_id_with_spaces(tmp_path: Path) -> None:
    text = (
        "name: t\nconcepts:\n  - {id: van-gogh, type: style}\n"
        "  - {id: elon-musk, type: id, text: Elon Musk}\n"
        "preserve:\n  - {id: claude-monet, type: style}\n"
    )
    m = load_manifest(write(tmp_path, text))
    assert [c.text for c in m.resolved_concepts()] == ["van gogh", "Elon Musk"]
    assert m.preserve[0].text == "claude monet"


def test_overrides_overlay_the_manifest_defaults(tmp_path: Path) -> None:
    text = """
name: t
defaults:
  invert: {tokens: 2}
  resteer: {steps: 50, lr: 2.0e-4, mask: attention}
concepts:
  - id: a
    type: id
    invert: {enabled: true, init_words: [person]}
    resteer: {steps: 10}
  - {id: b, type: object, mask: none}
  - {id: c, type: style, resteer: {mask: face, params: attn2}}
"""
    m = load_manifest(write(tmp_path, text))
    a, b, c = m.resolved_concepts()
    assert (a.invert.enabled, a.invert.tokens, a.invert.init_words) == (True, 2, ["person"])
    assert (a.resteer.steps, a.resteer.lr) == (10, 2e-4)
    assert (b.invert.enabled, b.resteer.steps, b.mask, b.resteer.mask) == (
        False,
        50,
        "none",
        "none",
    )
    assert (c.resteer.params, c.resteer.mask, c.mask) == ("attn2", "face", "face")
    assert a.mask == "attention"
    assert m.defaults.resteer.steps == 50  # overlaying does not touch the defaults
    assert m.resolve("b") == b


def test_relative_paths_resolve_against_the_manifest_folder(
    folders: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folders / "masks").mkdir()
    tiny_image(folders / "masks" / "a.png")
    text = """
name: t
concepts:
  - {id: a, type: id, images: ../faces, mask: {folder: ../masks}}
  - {id: b, type: id, images: IMAGES}
""".replace("IMAGES", str(folders / "faces"))
    path = write(folders / "manifests", text)
    elsewhere = folders / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a, b = load_manifest(path).resolved_concepts()
    assert (a.images, a.generate, a.mask) == (folders / "faces", None, folders / "masks")
    assert b.images == folders / "faces"


def test_resolve_unknown_concept(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, BASE))
    with pytest.raises(KeyError, match="no concept 'star'"):
        m.resolve("star")


@pytest.mark.parametrize("name", ["demo", "nightly"])
def test_bundled_manifests_load_and_name_world_concepts(name: str) -> None:
    m = load_manifest(ROOT / "manifests" / f"{name}.yaml")
    assert m.name == name
    assert m.base_model == "embedded:crowd-world"
    world = get_world(m.base_model)
    for c in [*m.concepts, *m.preserve]:
        assert world.get(c.id).type == c.type, c.id
    assert len(m.concepts) == {"demo": 6, "nightly": 24}[name]
    assert min(m.evaluate.seeds) >= 1000  # the measuring rule


def test_the_nightly_build_removes_held_out_concepts_of_every_type() -> None:
    m = load_manifest(ROOT / "manifests" / "nightly.yaml")
    world = get_world(m.base_model)
    assert {world.get(c.id).split for c in [*m.concepts, *m.preserve]} == {"heldout"}
    assert {c.type for c in m.concepts} == {"id", "object", "style"}
    assert {r.erase for r in m.resolved_concepts()} == {"gate"}


def test_published_schema_is_current() -> None:
    published = ROOT / "manifests" / "schema.json"
    regenerate = f"manifests/schema.json is stale; regenerate it with: {SCHEMA_COMMAND}"
    assert json.loads(published.read_text()) == manifest_schema(), regenerate
    assert published.read_text() == json.dumps(manifest_schema(), indent=2) + "\n", regenerate


def test_write_schema_writes_pretty_json(tmp_path: Path) -> None:
    path = write_schema(tmp_path / "schema.json")
    text = path.read_text()
    assert text.endswith("}\n") and text.startswith("{\n  ")
    assert json.loads(text) == manifest_schema()
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]  # no temp file left


def test_published_schema_agrees_with_the_loader() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(manifest_schema())
    demo = yaml.safe_load((ROOT / "manifests" / "demo.yaml").read_text())
    assert list(validator.iter_errors(demo)) == []
    assert list(validator.iter_errors({**demo, "conceptz": []}))
    assert list(validator.iter_errors({**demo, "merge": {"method": "avg"}}))
