"""The bad-input corpus: every folder of tests/bad_inputs/ (see its README.md) is one case.

A case runs one `fmn` command (typer's CliRunner, in process) on a temp copy of its
folder, with the cwd in that temp folder. A bad input must end with exit code 2, a
message that names the field or the file and gives a hint, no traceback, and nothing
left behind: the --out folder is not created and no file appears or changes (no temp
files, no unpickled payload's marker). Positive cases (exit 0) say what they create.

Binary inputs are made at set-up from the small recipes in each case.yaml (`make:`), so
the corpus holds text only.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from fmn.cli import app

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "case.yaml").is_file())
CASE_KEYS = {"about", "args", "exit", "names", "hint", "make", "creates"}
OTHER_BASE = "sha256:00000000deadbeef"  # no model has it
MARKER = "UNPICKLED"  # what a booby-trapped pickle creates when it is unpickled


def read_case(name: str) -> dict:
    case = yaml.safe_load((CORPUS / name / "case.yaml").read_text())
    assert set(case) <= CASE_KEYS, f"{name}: unknown keys {set(case) - CASE_KEYS}"
    return case


# ---- recipes for binary inputs ----------------------------------------------------------


class Models:
    """Base models the recipes and placeholders need, made on first use (once a session)."""

    def __init__(self, tmp_factory, tokenizer_dir_fn) -> None:
        self._tmp, self._tok, self._cache = tmp_factory, tokenizer_dir_fn, {}

    def _get(self, name: str):
        if name not in self._cache:
            from fmn.model.load import fingerprint, load_pipeline

            if name == "world":
                pipe, where = load_pipeline("embedded:tiny-world"), "embedded:tiny-world"
            else:  # a tiny SD1 pipeline saved to disk: another base, another architecture
                from tests.tiny import build_tiny_pipeline

                where = self._tmp.mktemp("tiny-sd1")
                build_tiny_pipeline("sd1", self._tok(), seed=0).save_pretrained(where)
                pipe = load_pipeline(where)
            shapes = {k: tuple(p.shape) for k, p in pipe.unet.named_parameters()}
            self._cache[name] = (str(where), fingerprint(pipe), shapes)
        return self._cache[name]

    def path(self, name: str) -> str:
        return self._get(name)[0]

    def fingerprint(self, name: str) -> str:
        return self._get(name)[1]

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        return self._get(name)[2]


def _image(spec: dict, path: Path) -> None:
    """A small picture in any PIL mode: {mode: RGBA, size: [w, h], noise: false}."""
    from PIL import Image

    w, h = spec.get("size", [40, 32])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
    if spec.get("noise"):  # incompressible, so a truncated file loses real pixel data
        base = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgb = np.stack([base, (yy * 255 // max(h - 1, 1)).astype(np.uint8), 255 - base], -1)
    mode = spec.get("mode", "RGB")
    if mode == "I;16":
        im = Image.fromarray(base.astype(np.uint16) * 257 + yy.astype(np.uint16))
        assert im.mode.startswith("I;16") or im.mode == "I"
    elif mode == "RGBA":
        alpha = np.where(xx < w // 2, 255, 64).astype(np.uint8)
        im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "P":  # palette with a transparent index
        im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 0
    else:
        im = Image.fromarray(rgb).convert(mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    kwargs = {"transparency": 0} if mode == "P" else {}
    im.save(path, format=fmt, **kwargs)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(size: list[int], path: Path) -> None:
    """A valid, tiny PNG whose header claims w x h RGB pixels (never decode it)."""
    w, h = size
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
    path.write_bytes(png + _chunk(b"IEND", b""))


class _Payload:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_trap(spec: dict, path: Path, case_dir: Path) -> None:
    """A booby-trapped checkpoint: torch.save's zip (or a plain pickle) of a payload."""
    payload = {"state_dict": _Payload(case_dir / MARKER)}
    if spec.get("plain"):
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)


def _patch(spec: dict, path: Path, models: Models) -> None:
    """An fmn patch (or something posing as one) for a base model's UNet.

    base: world | tiny-sd1 | other;  concept, type, text;  keys: how many attn2 to_k/to_v
    weights it changes;  unknown_key / wrong_shape / nan / zero: make it bad that way;
    format: fmn | none | lora;  format_version."""
    base = spec.get("base", "world")
    shapes = models.shapes("tiny-sd1" if base == "tiny-sd1" else "world")
    fp = {"other": OTHER_BASE}.get(base) or models.fingerprint(base)
    keys = sorted(k for k in shapes if re.search(r"attn2\.to_[kv]\.weight$", k))
    gen = torch.Generator().manual_seed(len(keys))
    deltas = {k: 1e-3 * torch.randn(shapes[k], generator=gen) for k in keys[: spec.get("keys", 2)]}
    first = next(iter(deltas))
    if spec.get("unknown_key"):
        deltas["down_blocks.9.attentions.0.extra.weight"] = torch.zeros(4, 4)
    if spec.get("wrong_shape"):
        deltas[first] = torch.zeros(deltas[first].shape[0] + 1, deltas[first].shape[1])
    if spec.get("nan"):
        deltas[first][0, 0] = float("nan")
    if spec.get("zero"):
        deltas = {k: torch.zeros_like(v) for k, v in deltas.items()}
    concept = spec.get("concept", "circle")
    config = {"concept": {"id": concept, "type": spec.get("type", "object"), "text": concept}}
    config["resteer"] = {"positions": "concept"}
    meta = {
        "format": "fmn-patch",
        "format_version": str(spec.get("format_version", 1)),
        "concept": concept,
        "method": "resteer",
        "base_fingerprint": fp,
        "config": json.dumps(config, sort_keys=True),
        "extra": "{}",
    }
    fmt = spec.get("format", "fmn")
    if fmt == "none":
        meta = None
    elif fmt == "lora":
        meta = {"format": "pt"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in deltas.items()}, str(path), metadata=meta)


def _ti(spec: dict, path: Path) -> None:
    """A TI file: {dim: 768, n: 2, tokens: ["<concept>"]} (SDXL's has clip_l and clip_g)."""
    tokens = spec.get("tokens", ["<concept>"])
    save_file({t: torch.randn(spec.get("n", 2), spec["dim"]) for t in tokens}, path)


def make(rel: str, spec: dict, case_dir: Path, models: Models) -> None:
    path = case_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    (kind,) = set(spec) - {"keep"}
    if kind == "dir":
        path.mkdir(exist_ok=True)
    elif kind == "text":
        path.write_text(spec["text"])
    elif kind == "bytes":  # {bytes: 40}: random bytes; {bytes: "fffe00"}: these (hex)
        value = spec["bytes"]
        rng = np.random.default_rng(0)
        path.write_bytes(bytes.fromhex(value) if isinstance(value, str) else rng.bytes(value))
    elif kind == "image":
        _image(spec["image"] or {}, path)
    elif kind == "bomb":
        _bomb(spec["bomb"], path)
    elif kind == "pickle_trap":
        _pickle_trap(spec["pickle_trap"] or {}, path, case_dir)
    elif kind == "patch":
        _patch(spec["patch"] or {}, path, models)
    elif kind == "ti":
        _ti(spec["ti"], path)
    else:
        raise AssertionError(f"unknown recipe {kind!r} for {rel}")
    if "keep" in spec:  # truncate: keep this fraction of the bytes
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * spec["keep"])])


# ---- the test -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, request) -> Models:
    return Models(tmp_path_factory, lambda: request.getfixturevalue("clip_tokenizer_dir"))


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def _plain(text: str) -> str:
    """Output without colour codes, rich's box characters and line wrapping."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"[│╭╮╰╯─┃━]", " ", text)
    return " ".join(text.split())


def _fill(value: str, places: dict[str, str], models: Models) -> str:
    for key, path in places.items():
        value = value.replace("{" + key + "}", path)
    if "{tiny-sd1}" in value:
        value = value.replace("{tiny-sd1}", models.path("tiny-sd1"))
    return value


def test_corpus_is_big_enough() -> None:
    cases = [read_case(n) for n in CASES]
    bad = [c for c in cases if c.get("exit", 2) == 2]
    assert len(cases) >= 30 and len(bad) >= 30
    assert all(c.get("names") and c.get("hint") for c in bad), "every bad case: names + hint"


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name: str, tmp_path: Path, models: Models, monkeypatch) -> None:
    case = read_case(name)
    work, out = tmp_path / "case", tmp_path / "out"
    import shutil

    shutil.copytree(CORPUS / name, work, ignore=shutil.ignore_patterns("case.yaml"))
    for rel, spec in (case.get("make") or {}).items():
        make(rel, spec, work, models)
    places = {"case": str(work), "out": str(out)}
    args = [_fill(str(a), places, models) for a in case["args"]]
    monkeypatch.chdir(tmp_path)  # whatever a command writes to its cwd lands in the snapshot
    before = _snapshot(tmp_path)

    result = CliRunner().invoke(app, args, env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})

    output = _plain(result.output)
    expected = case.get("exit", 2)
    detail = f"{name}: exit {result.exit_code}\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{name}: raised instead of a clean exit {expected}:\n{tb}")
    assert result.exit_code == expected, detail
    assert "Traceback" not in result.output, detail
    for part in [*case.get("names", []), *case.get("hint", [])]:
        part = _plain(_fill(part, places, models))
        assert part in output, f"{name}: {part!r} not in the message:\n{output}"
    assert not (work / MARKER).exists(), f"{name}: a pickle was unpickled"
    if expected == 2:
        assert not out.exists(), f"{name}: --out {out} was created"
        assert _snapshot(tmp_path) == before, f"{name}: files were left behind or changed"
    for rel in case.get("creates", []):
        assert Path(_fill(rel, places, models)).exists(), f"{name}: {rel} was not created"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"{name}: temp files left: {leftovers}"


# ---- TI files: no command reads one, so the same checks at the Python API ------------------

TI_CASES = {
    # name: (recipe, what the message must contain)
    "wrong-dimension": ({"ti": {"dim": 48}}, ["ti.safetensors", "dimension 48", "expects"]),
    "sdxl-ti-on-sd1": (
        {"ti": {"dim": 32, "tokens": ["clip_l", "clip_g"]}},
        ["ti.safetensors", "needs a TI with a single key", "an SDXL embedding?"],
    ),
    "truncated": ({"ti": {"dim": 64}, "keep": 0.5}, ["ti.safetensors", "truncated"]),
    "pickle": ({"pickle_trap": None}, ["ti.pt", "pickles"]),
    "not-safetensors": ({"text": "<concept> 0.1 0.2\n"}, ["ti.txt", "not a .safetensors TI file"]),
}


@pytest.fixture(scope="module")
def world_pipe():
    from fmn.model.load import load_pipeline

    return load_pipeline("embedded:tiny-world")


@pytest.mark.parametrize("name", sorted(TI_CASES))
def test_bad_ti_file(name: str, tmp_path: Path, models: Models, world_pipe) -> None:
    from fmn.train.invert import TIFormatError, load_ti

    recipe, parts = TI_CASES[name]
    file = {"pickle": "ti.pt", "not-safetensors": "ti.txt"}.get(name, "ti.safetensors")
    make(file, recipe, tmp_path, models)
    with pytest.raises(TIFormatError) as info:
        load_ti(tmp_path / file, world_pipe)
    for part in parts:
        assert part in str(info.value), str(info.value)
    assert not (tmp_path / MARKER).exists()
