"""The `fmn` command end to end on tiny models saved to disk (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fmn.cli import app
from fmn.model.load import fingerprint, load_pipeline
from fmn.model.patch import load_patch
from tests.tiny import build_tiny_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, clip_tokenizer_dir):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    build_tiny_pipeline("sd1", clip_tokenizer_dir, seed=0).save_pretrained(root / "a")
    build_tiny_pipeline("sd1", clip_tokenizer_dir, seed=1).save_pretrained(root / "b")
    return root / "a", root / "b"


def test_validate_names_the_field_and_exits_2(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nconcepts:\n  - {id: star, type: object}\n  - {id: star, type: style}\n"
    )
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "concepts.1.id" in result.output and "duplicate" in result.output


def test_validate_accepts_the_shipped_manifests() -> None:
    shipped = sorted((Path(__file__).resolve().parents[1] / "manifests").glob("*.yaml"))
    assert {"demo.yaml", "nightly.yaml", "words.yaml", "correct.yaml"} <= {m.name for m in shipped}
    for m in shipped:
        result = runner.invoke(app, ["validate", str(m)])
        assert result.exit_code == 0, result.output


def test_forget_apply_export(model_dirs, tmp_path) -> None:
    base, other = model_dirs
    out = tmp_path / "star"
    args = ["forget", "--model", str(base), "--id", "star", "--type", "object", "--generate", "2"]
    args += ["--erase", "resteer"]  # objects are gated by default: test_eraser.py
    # the closed loop judges rungs with generated images: tests/test_loop.py runs it
    result = runner.invoke(
        app, [*args, "--steps", "2", "--lr", "1e-2", "--no-loop", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    patch = load_patch(out)
    assert patch.concept == "star" and patch.config["resteer"]["steps"] == 2
    assert patch.base_fingerprint == fingerprint(load_pipeline(str(base)))
    assert (out / "resteer.json").exists()

    patched = tmp_path / "patched"
    result = runner.invoke(
        app, ["apply", "--model", str(base), "--patch", str(out), "--out", str(patched)]
    )
    assert result.exit_code == 0, result.output
    assert fingerprint(load_pipeline(str(patched))) != patch.base_fingerprint

    refused = runner.invoke(
        app, ["apply", "--model", str(other), "--patch", str(out), "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "base" in refused.output
    assert not (tmp_path / "x").exists(), "a refused apply leaves nothing behind"

    for fmt in ("lora", "kohya"):
        result = runner.invoke(
            app,
            [
                "export",
                "--patch",
                str(out),
                "--format",
                fmt,
                "--out",
                str(tmp_path / f"{fmt}.safetensors"),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "relative error" in result.output and (tmp_path / f"{fmt}.safetensors").exists()
