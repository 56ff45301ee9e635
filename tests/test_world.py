"""The embedded world's generator, tokenizer and concept table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fmn.cli import app
from fmn.world.concepts import COLOURS, HEADS, get_concept, world_concepts
from fmn.world.generator import NONE, dataset, object_caption
from fmn.world.render import render_face, render_object
from fmn.world.tokenizer import load_tokenizer


def test_every_category_has_at_least_eight_concepts() -> None:
    by_type: dict[str, list[str]] = {}
    for c in world_concepts():
        by_type.setdefault(c.type, []).append(c.id)
    assert {t: len(v) >= 8 for t, v in by_type.items()} == {
        "id": True,
        "object": True,
        "style": True,
    }
    ids = [c.id for c in world_concepts()]
    assert len(ids) == len(set(ids)), "concept ids must be unique across categories"


def test_generator_is_deterministic_by_seed() -> None:
    a, b, c = dataset(16, seed=5), dataset(16, seed=5), dataset(16, seed=6)
    assert np.array_equal(a["images"], b["images"]) and a["captions"] == b["captions"]
    assert not np.array_equal(a["images"], c["images"])


def test_captions_name_the_labelled_concepts() -> None:
    d = dataset(300, seed=1)
    for caption, i in zip(d["captions"], range(300), strict=True):
        labels = {h: d["labels"][h][i] for h in HEADS}
        if labels["identity"] != NONE:
            assert caption.endswith(HEADS["identity"][labels["identity"]])
            assert labels["shape"] == labels["style"] == NONE
        else:
            named = [HEADS[h][labels[h]] for h in ("shape", "style", "colour")]
            # parts may be dropped from a caption, but nothing else may be named
            words = set(caption.split())
            others = {w for h in ("shape", "style", "colour") for w in HEADS[h]} - set(named)
            assert not (words & others), caption


@pytest.mark.parametrize("shape", HEADS["shape"])
def test_object_mask_covers_the_drawn_shape(shape: str) -> None:
    rng = np.random.default_rng(0)
    image, mask = render_object(shape, "flat", "blue", 32, rng)
    blue = (image[..., 2] > 150) & (image[..., 0] < 110)
    assert 40 < mask.sum() < 32 * 32 * 0.6, "shape should fill part of the image"
    assert mask[blue].mean() > 0.9, "blue pixels lie inside the ground-truth mask"


@pytest.mark.parametrize("name", HEADS["identity"])
def test_faces_differ_between_identities(name: str) -> None:
    img, mask = render_face(name, 32, np.random.default_rng(0))
    others = [
        render_face(o, 32, np.random.default_rng(0))[0] for o in HEADS["identity"] if o != name
    ]
    diffs = [np.abs(img.astype(int) - o.astype(int)).mean() for o in others]
    assert min(diffs) > 8, (
        f"{name} is too close to another identity: mean abs diff {min(diffs):.1f}"
    )
    assert mask.sum() > 100


def test_caption_grammar() -> None:
    assert object_caption("arrow", "dots", "orange", "a photo") == (
        "a photo of an orange arrow in the style of dots"
    )
    assert object_caption(None, "night", "red", "a picture") == "a picture in the style of night"
    assert object_caption("star", None, None, "an image") == "an image of a star"


def test_tokenizer_matches_openai_clip(clip_tokenizer_dir) -> None:
    tok = load_tokenizer(clip_tokenizer_dir, 77)
    assert len(tok) == 49408
    assert tok("a photo of elon musk").input_ids == [49406, 320, 1125, 539, 20406, 19063, 49407]
    # every world concept is a single token, so its token position is unambiguous
    for c in world_concepts():
        assert len(tok(c.text).input_ids) == 3, c.text
    assert set(COLOURS) <= {tok.decode(tok(c).input_ids[1:-1]).strip() for c in COLOURS}


def test_broken_tokenizer_folder_is_refused(tmp_path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(Exception, match=r"expected 49408|vocab"):
        load_tokenizer(tmp_path, 77)


def test_get_concept_hints_valid_ids() -> None:
    assert get_concept("star").type == "object"
    with pytest.raises(KeyError, match="valid ids: alice"):
        get_concept("unicorn")


def test_cli_lists_concepts_as_json() -> None:
    result = CliRunner().invoke(app, ["world", "concepts", "--json"])
    assert result.exit_code == 0, result.output
    items = json.loads(result.output)
    assert {"id": "star", "type": "object", "text": "star", "split": "tune"} in items
    assert len(items) == len(world_concepts())


def test_world_build_runs_end_to_end_and_resumes(tmp_path) -> None:
    """`fmn world build --quick`: every stage with a few steps (plumbing, not quality). Out
    of time (`--minutes 0`), it stops at the first UNet checkpoint; run again, it goes on
    from there."""
    out = tmp_path / "world"
    quick = ["world", "build", "--quick", "--out", str(out), "--threads", "1"]
    result = CliRunner().invoke(app, [*quick, "--minutes", "0"])
    assert result.exit_code == 0, result.output
    assert "paused after UNet step 1 of 3" in " ".join(result.output.split())
    assert (out / "unet.ckpt" / "step.json").is_file() and not (out / "unet").exists()
    result = CliRunner().invoke(app, quick)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"stage": "unet", "resumed_at": 1} in log
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "classifier"):
        assert (out / part).is_dir(), part
    report = json.loads((out / "world_report.json").read_text())
    assert set(report["base_mscore"]) == {c.id for c in world_concepts()}
    assert (out / "grid.png").stat().st_size > 1000
    stages = [
        json.loads(line)["stage"] for line in (out / "train_log.jsonl").read_text().splitlines()
    ]
    assert {"vae", "unet", "classifier"} <= set(stages)
    # a second build finds every stage on disk and trains nothing again
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(
        app, ["world", "build", "--quick", "--out", str(out), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_ship_never_leaves_the_installed_world_missing(tmp_path) -> None:
    """A ship that fails halfway (here: a build without its classifier) leaves the world
    installed before it in place, whole."""
    from fmn.world.evaluate import ship

    build = tmp_path / "build"
    for sub in ["unet", "vae", "text_encoder", "scheduler", "classifier", "tokenizer"]:
        (build / sub).mkdir(parents=True)
        (build / sub / "config.json").write_text("{}")
    (build / "model_index.json").write_text("{}")
    dest = tmp_path / "assets" / "w"
    ship(build, dest)
    assert (dest / "classifier" / "config.json").is_file()
    import shutil

    shutil.rmtree(build / "classifier")
    with pytest.raises(FileNotFoundError):
        ship(build, dest)
    assert (dest / "classifier" / "config.json").is_file(), "the old install must survive"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["w"], "no temp folder is left"


def test_ship_shares_one_vocabulary_between_worlds(tmp_path) -> None:
    """The vocabulary goes once into the shared folder beside the worlds; a world whose
    vocabulary differs is refused rather than silently given another's."""
    from fmn.world import SHARED_TOKENIZER
    from fmn.world.evaluate import ship

    build = tmp_path / "build"
    for sub in ["unet", "vae", "text_encoder", "scheduler", "classifier", "tokenizer"]:
        (build / sub).mkdir(parents=True)
        (build / sub / "config.json").write_text("{}")
    for name, text in [("vocab.json", "{}"), ("merges.txt", "#v"), ("tokenizer_config.json", "{}")]:
        (build / "tokenizer" / name).write_text(text)
    (build / "model_index.json").write_text("{}")
    assets = tmp_path / "assets"
    ship(build, assets / "a")
    ship(build, assets / "b")
    assert (assets / SHARED_TOKENIZER / "vocab.json").read_text() == "{}"
    for world in "ab":
        assert sorted(p.name for p in (assets / world / "tokenizer").iterdir()) == [
            "tokenizer_config.json"
        ]
    (build / "tokenizer" / "merges.txt").write_text("#other")
    with pytest.raises(ValueError, match="differs"):
        ship(build, assets / "c")
    assert not (assets / "c").exists()


def test_crowd_world_ships_its_token_table_as_trained_rows_and_a_seed(tmp_path) -> None:
    """crowd-world's text encoder is wide (256) and trains only the token rows its captions
    use: the shipped folder keeps those rows and the seed of the rest, not the 49408-row
    table, and loads back into the same text encoder, any token's row included."""
    from safetensors import safe_open

    from fmn.model.load import load_pipeline
    from fmn.world import token_rows
    from fmn.world.evaluate import ship

    out = tmp_path / "build"
    args = ["world", "build", "--world", "crowd-world", "--quick", "--until", "unet"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    (out / "classifier").mkdir()  # not needed here
    dest = ship(out, tmp_path / "assets" / "crowd-world")
    with safe_open(str(dest / "text_encoder" / "model.safetensors"), framework="pt") as f:
        names = f.keys()
    assert names and not [k for k in names if k.endswith(token_rows.TABLE_KEY)]
    with safe_open(str(dest / "text_encoder" / token_rows.ROWS_FILE), framework="pt") as f:
        ids = f.get_tensor("ids")
    assert 50 < len(ids) < 2000, "the rows world captions use, not the whole vocabulary"
    built, shipped = load_pipeline(str(out)), load_pipeline(str(dest))
    table = shipped.text_encoder.get_input_embeddings().weight
    assert table.shape == (49408, 256)
    assert torch.equal(built.text_encoder.get_input_embeddings().weight.half().float(), table)
    prompt = ["a photo of mary", "zebra sushi"]  # the second: rows no caption trained
    tok = built.tokenizer(prompt, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        a = built.text_encoder(tok.input_ids)[0]
        b = shipped.text_encoder(tok.input_ids)[0]
    assert torch.allclose(a, b, atol=0.02), "fp16 shipping rounds; nothing else differs"
    assert not torch.allclose(a[0], a[1], atol=0.02)
