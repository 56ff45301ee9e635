"""Patch files, apply/revert, and LoRA exports, on tiny real pipelines of every family.

A patch here is made the way re-steering makes one: perturb a copy's attn2 weights and
take trained minus base. Images are 16 px, 2 denoising steps, fixed seeds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from fmn.model import lora_keys
from fmn.model.load import fingerprint
from fmn.model.patch import (
    Patch,
    PatchError,
    apply_patch,
    export_kohya,
    export_lora,
    load_patch,
    patch_hash,
    revert_patch,
    save_patch,
)
from tests.tiny import FAMILIES, build_tiny_pipeline

TO_KV = re.compile(r"attn2\.to_[kv]\.weight$")
# to_q is square (inner x inner) while to_k/to_v read the text (inner x text width): in
# SD1/SD2 their full ranks differ, which is what exercises per-module LoRA scales
TO_QKV = re.compile(r"attn2\.to_[qkv]\.weight$")
LORA_ATOL = 1e-4  # images in [0, 1]; full-rank LoRA measured at <= 3e-6 on every family
EXPORTERS = {"peft": export_lora, "kohya": export_kohya}


@pytest.fixture
def make_pipe(clip_tokenizer_dir: Path):
    def make(family: str = "sd1", seed: int = 0):
        return build_tiny_pipeline(family, clip_tokenizer_dir, seed=seed)

    return make


def images(pipe) -> torch.Tensor:
    out = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return torch.from_numpy(out.images)


def random_deltas(
    pipe, pattern: re.Pattern = TO_KV, seed: int = 1, rank: int | None = None
) -> dict[str, torch.Tensor]:
    """Small random deltas for the matching UNet weights; of rank `rank` when given."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, p in pipe.unet.named_parameters():
        if pattern.search(name):
            if rank is None:
                deltas[name] = 0.1 * torch.randn(p.shape, generator=g)
            else:
                up, down = (
                    torch.randn(p.shape[0], rank, generator=g),
                    torch.randn(rank, p.shape[1], generator=g),
                )
                deltas[name] = 0.1 * up @ down / rank
    return deltas


def make_patch(pipe, deltas: dict[str, torch.Tensor], concept: str = "cat") -> Patch:
    return Patch(
        concept=concept,
        method="resteer",
        deltas=deltas,
        config={"steps": 2, "lr": 1e-4, "params": "to_kv"},
        base_fingerprint=fingerprint(pipe),
        extra={"note": "test"},
    )


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


# ---- file format ---------------------------------------------------------------------


def test_save_load_round_trip(make_pipe, tmp_path: Path) -> None:
    pipe = make_pipe()
    patch = make_patch(pipe, random_deltas(pipe))
    path = save_patch(patch, tmp_path / "cat")
    assert path == tmp_path / "cat" / "delta.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["delta.safetensors"]  # no temp left

    loaded = load_patch(tmp_path / "cat")
    assert (loaded.concept, loaded.method, loaded.config, loaded.extra) == (
        "cat",
        "resteer",
        patch.config,
        {"note": "test"},
    )
    assert loaded.base_fingerprint == fingerprint(pipe)
    assert loaded.format_version == 1 and loaded.created == patch.created is not None
    assert loaded.deltas.keys() == patch.deltas.keys()
    assert all(torch.equal(loaded.deltas[k], v) for k, v in patch.deltas.items())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "fmn-patch" and meta["config_hash"] == patch.config_hash

    assert patch_hash(path) == patch_hash(path.parent)
    assert patch_hash(path).startswith("sha256:") and len(patch_hash(path)) == 7 + 64
    half = save_patch(patch, tmp_path / "cat-fp16", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    assert patch_hash(half) != patch_hash(path)
    back = load_patch(half)
    assert all(back.deltas[k].dtype == torch.float32 for k in back.deltas)
    assert all(torch.allclose(back.deltas[k], v, atol=1e-3) for k, v in patch.deltas.items())


def test_nan_delta_refused_on_save_and_load(make_pipe, tmp_path: Path) -> None:
    pipe = make_pipe()
    deltas = random_deltas(pipe)
    bad = sorted(deltas)[3]
    deltas[bad][0, 0] = float("nan")
    patch = make_patch(pipe, deltas)
    with pytest.raises(PatchError, match=rf"'cat'.*{re.escape(bad)}"):
        save_patch(patch, tmp_path / "out")
    assert not (tmp_path / "out" / "delta.safetensors").exists()

    deltas[bad][0, 0] = 1e6  # finite, but not in float16
    with pytest.raises(PatchError, match="float16"):
        save_patch(make_patch(pipe, deltas), tmp_path / "out", dtype=torch.float16)

    # a file written by something else, with an Inf inside
    deltas[bad][0, 0] = float("inf")
    good = save_patch(make_patch(pipe, {k: v for k, v in deltas.items() if k != bad}), tmp_path)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in deltas.items()}, str(good), metadata=meta)
    with pytest.raises(PatchError, match=re.escape(bad)):
        load_patch(good)


def test_truncated_file_refused(make_pipe, tmp_path: Path) -> None:
    pipe = make_pipe()
    path = save_patch(make_patch(pipe, random_deltas(pipe)), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchError, match=r"delta\.safetensors is truncated"):
        load_patch(path)


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".pkl"])
def test_pickle_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"delta{suffix}"
    path.write_bytes(b"not read")
    with pytest.raises(PatchError, match=r"never unpickle\. Convert"):
        load_patch(path)


def test_unknown_format_or_newer_version_refused(make_pipe, tmp_path: Path) -> None:
    pipe = make_pipe()
    deltas = {k: v.contiguous() for k, v in random_deltas(pipe).items()}
    save_file(deltas, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PatchError, match="not an fmn patch"):
        load_patch(tmp_path / "plain.safetensors")

    path = save_patch(make_patch(pipe, deltas), tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(deltas, str(path), metadata=meta | {"format_version": "2"})
    with pytest.raises(PatchError, match="version 2, newer"):
        load_patch(path)

    lora = export_lora(make_patch(pipe, deltas), tmp_path / "lora.safetensors")
    with pytest.raises(PatchError, match="looks like a LoRA"):
        load_patch(lora["path"])


# ---- apply / revert ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_gives_trained_model_and_revert_gives_base(make_pipe, family: str) -> None:
    base, trained = make_pipe(family), make_pipe(family)
    base_fp, base_images = fingerprint(base), images(base)
    with torch.no_grad():
        for name, noise in random_deltas(trained).items():
            trained.unet.get_parameter(name).add_(noise)
    trained_images = images(trained)
    assert (trained_images - base_images).abs().max() > 1e-2  # the patch is visible
    base_params = dict(base.unet.named_parameters())
    deltas = {
        n: (p.detach() - base_params[n].detach()).clone()
        for n, p in trained.unet.named_parameters()
        if TO_KV.search(n)
    }
    patch = make_patch(base, deltas)

    apply_patch(base, patch)
    assert fingerprint(base) != base_fp
    assert torch.allclose(images(base), trained_images, atol=1e-5)

    revert_patch(base, patch)
    assert fingerprint(base) == base_fp  # the kept originals are restored bit for bit
    assert torch.equal(images(base), base_images)


def test_revert_is_exact_in_lifo_order_and_close_otherwise(make_pipe) -> None:
    pipe = make_pipe()
    base_fp, before = fingerprint(pipe), unet_state(pipe)
    first = make_patch(pipe, random_deltas(pipe, seed=1), "cat")
    second = make_patch(pipe, random_deltas(pipe, seed=2), "dog")
    apply_patch(pipe, first)
    apply_patch(pipe, second, scale=0.5, check_base=False)  # made for the base, not base+cat
    revert_patch(pipe, second, scale=0.5)
    revert_patch(pipe, first)
    assert fingerprint(pipe) == base_fp

    # without kept originals revert subtracts: equal up to float rounding, which may move
    # the fingerprint, so the weights are compared instead
    apply_patch(pipe, first, keep_original=False)
    revert_patch(pipe, first)
    after = unet_state(pipe)
    assert all(torch.allclose(after[k], v, rtol=0, atol=1e-6) for k, v in before.items())


def test_refuses_another_base(make_pipe) -> None:
    made_on, other = make_pipe(seed=0), make_pipe(seed=1)
    patch = make_patch(made_on, random_deltas(made_on))
    other_fp = fingerprint(other)
    with pytest.raises(PatchError) as err:
        apply_patch(other, patch)
    message = str(err.value)
    assert patch.base_fingerprint in message and other_fp in message
    assert "check_base=False" in message and "--force" in message
    assert fingerprint(other) == other_fp

    apply_patch(other, patch, check_base=False)
    assert fingerprint(other) != other_fp


def test_unknown_keys_and_shape_mismatch_change_nothing(make_pipe) -> None:
    pipe = make_pipe()
    base_fp = fingerprint(pipe)
    deltas = random_deltas(pipe)
    unknown = make_patch(pipe, deltas | {"down_blocks.7.attn9.to_k.weight": torch.zeros(2, 2)})
    with pytest.raises(PatchError, match=r"1 keys that are not parameters.*down_blocks\.7\.attn9"):
        apply_patch(pipe, unknown)
    prefixed = make_patch(pipe, {f"unet.{k}": v for k, v in deltas.items()})
    with pytest.raises(PatchError, match="drop it"):
        apply_patch(pipe, prefixed)

    key = sorted(deltas)[-1]  # the earlier keys would apply fine: all or nothing
    wrong = make_patch(pipe, deltas | {key: deltas[key].T.contiguous()})
    shape, transposed = tuple(deltas[key].shape), tuple(deltas[key].T.shape)
    with pytest.raises(PatchError, match=re.escape(f"{key} has shape {transposed}")) as err:
        apply_patch(pipe, wrong)
    assert str(shape) in str(err.value)
    assert fingerprint(pipe) == base_fp


# ---- LoRA exports --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(EXPORTERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_export_loads_in_diffusers_at_scale_one(
    make_pipe, tmp_path: Path, family: str, kind: str
) -> None:
    patched = make_pipe(family)
    patch = make_patch(patched, random_deltas(patched, TO_QKV))
    report = EXPORTERS[kind](patch, tmp_path / "cat.safetensors")
    assert report["relative_error"] < 1e-6
    apply_patch(patched, patch)
    want = images(patched)

    pipe = make_pipe(family)
    pipe.load_lora_weights(str(tmp_path), weight_name="cat.safetensors", adapter_name="cat")
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(patch.deltas)
    # the effective factor on B @ A is alpha / r times what the file holds; for kohya, the
    # up matrices of off-default ranks carry r / alpha, so only the product is 1
    if kind == "peft":
        assert {m.scaling["cat"] for m in layers} == {1.0}
    assert (images(pipe) - want).abs().max() < LORA_ATOL

    pipe.fuse_lora(adapter_names=["cat"])
    assert (images(pipe) - want).abs().max() < LORA_ATOL


def test_lora_rank_r_error(make_pipe, tmp_path: Path) -> None:
    pipe = make_pipe()
    low = make_patch(pipe, random_deltas(pipe, rank=2))
    errors = {
        r: export_lora(low, tmp_path / f"low{r}.safetensors", r)["relative_error"]
        for r in (1, 2, 4)
    }
    assert errors[1] > 0.05 and errors[2] < 1e-6 and errors[4] < 1e-6

    full = make_patch(pipe, random_deltas(pipe, TO_QKV))
    reports = {
        r: export_kohya(full, tmp_path / f"full{r}.safetensors", r) for r in (1, 4, 16, None)
    }
    errors = [reports[r]["relative_error"] for r in (1, 4, 16, None)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5 and errors[-1] < 1e-6
    assert reports[4]["rank"] == 4 and reports[None]["rank"] == 64  # to_q is 64 x 64

    # the file: r x in down, out x r up, one alpha, named after real modules
    with safe_open(reports[4]["path"], framework="pt") as f:
        keys = set(f.keys())
        name = sorted(full.deltas)[0]
        module = lora_keys.module_of(name)
        assert f.get_tensor(lora_keys.KOHYA.down_key(module)).shape == (
            4,
            full.deltas[name].shape[1],
        )
        assert f.get_tensor(lora_keys.KOHYA.up_key(module)).shape == (full.deltas[name].shape[0], 4)
        assert f.get_tensor(lora_keys.KOHYA.alpha_key(module)).item() == 4.0
        assert f.metadata()["base_fingerprint"] == full.base_fingerprint
    known = [n for n, _ in pipe.unet.named_modules()]
    assert lora_keys.modules_from_keys(keys, lora_keys.KOHYA, known) == {
        lora_keys.module_of(k) for k in full.deltas
    }


def test_lora_export_refuses_what_lora_cannot_carry(make_pipe, tmp_path: Path) -> None:
    pipe = make_pipe()
    deltas = random_deltas(pipe)
    bias = "mid_block.attentions.0.proj_out.bias"
    zero = make_patch(pipe, deltas | {bias: torch.zeros(64)})
    assert export_lora(zero, tmp_path)["skipped"] == [bias]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    nonzero = make_patch(pipe, deltas | {bias: torch.ones(64)})
    with pytest.raises(PatchError, match=re.escape(bias)):
        export_kohya(nonzero, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()
