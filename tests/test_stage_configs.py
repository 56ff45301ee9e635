"""One source of truth for every stage's options: the manifest's models (fmn.manifest).

The library's configs are derived from them, `fmn forget` resolves its options like a
manifest concept, and so `fmn forget` and `fmn run` make the same patch of a concept.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import get_args

import pytest
import torch
from typer.testing import CliRunner

from fmn.cli import app
from fmn.manifest import (
    TYPE_DEFAULTS,
    ConceptType,
    InvertOptions,
    Merge,
    ResteerOptions,
    option_default,
    type_defaults,
)
from fmn.merge.fuse import MergeConfig
from fmn.model.patch import load_patch
from fmn.run.folder import RunPaths
from fmn.run.stages import stage_invert, stage_prepare, stage_resteer
from fmn.train.invert import InvertConfig
from fmn.train.resteer import ResteerConfig, resteer_config_for

runner = CliRunner()


def test_configs_take_every_option_and_its_default_from_the_manifest() -> None:
    # from_options / from_manifest pass every option by name: one the config lacks fails
    assert MergeConfig.from_manifest(Merge()) == MergeConfig()
    assert InvertConfig.from_options(InvertOptions(), seed=0) == InvertConfig()
    for kind in get_args(ConceptType):
        assert ResteerConfig.from_options(kind, ResteerOptions()) == resteer_config_for(kind)
    shared = {f.name for f in fields(ResteerConfig)} & set(ResteerOptions.model_fields)
    assert shared == set(ResteerOptions.model_fields) - {"mask"}
    by_type = {"positions", "preserve_weight"}  # ResteerOptions: None, by concept type
    for name in shared - by_type:
        assert getattr(ResteerConfig(), name) == option_default(ResteerOptions, name), name
    assert {n: getattr(ResteerConfig(), n) for n in by_type} == type_defaults()
    assert set(TYPE_DEFAULTS) <= set(get_args(ConceptType))
    with pytest.raises(TypeError):
        MergeConfig("sum")  # type: ignore[misc]  # nothing is filled by position


def test_config_defaults_are_fresh_copies() -> None:
    a = MergeConfig()
    a.weights["x"] = 2.0
    a.anchors["x"] = "a thing"
    assert MergeConfig().weights == {} and MergeConfig().anchors == {}


@pytest.mark.parametrize(
    ("concept", "cli", "yaml"),
    [
        # the mask is left to the default on both sides: auto (attention masks for objects).
        # Without the closed loop, which would judge 3 rungs of these 1-2 step patches; its
        # setting and rungs are part of the config compared (test_loop.py runs it)
        (("triangle", "object"), ["--steps", "2", "--no-loop"], "resteer: {steps: 2, loop: false}"),
        (
            ("outline", "style"),
            ["--steps", "1", "--no-loop", "--invert", "--ti-steps", "2", "--ti-tokens", "2"],
            "resteer: {steps: 1, loop: false}, invert: {enabled: true, steps: 2, tokens: 2}",
        ),
    ],
    ids=["resteer", "invert+resteer"],
)
def test_fmn_forget_and_fmn_run_make_the_same_patch(tmp_path: Path, concept, cli, yaml) -> None:
    torch.set_num_threads(1)  # what `fmn forget --threads 1` sets; both sides run under it
    cid, kind = concept
    out = tmp_path / "forget"
    args = ["forget", "--id", cid, "--type", kind, "--generate", "2", *cli, "--out", str(out)]
    args += ["--erase", "resteer"]  # gated by default otherwise (test_eraser.py)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    manifest = tmp_path / "one.yaml"
    manifest.write_text(
        "name: one\nbase_model: embedded:tiny-world\nconcepts:\n"
        f"  - {{id: {cid}, type: {kind}, erase: resteer, images: {{generate: 2}}, {yaml}}}\n"
    )
    run = tmp_path / "run"
    prep = stage_prepare(manifest, cid, run)
    ti = stage_invert(manifest, cid, run, prep) if "--invert" in cli else None
    stage_resteer(manifest, cid, run, prep, ti)

    forgot, built = load_patch(out), load_patch(RunPaths(run).patch(cid))
    assert forgot.config["mask"] == "auto"
    assert forgot.method == built.method == ("resteer+ti" if ti else "resteer")
    assert forgot.config == built.config  # resolved options, masks, preserve list, TI
    assert forgot.base_fingerprint == built.base_fingerprint
    assert sorted(forgot.deltas) == sorted(built.deltas)
    for name, delta in forgot.deltas.items():
        assert torch.equal(delta, built.deltas[name]), name
