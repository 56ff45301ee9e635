"""Patch: the dense weight deltas one concept (or a merge of many) makes to a UNet.

A patch is a `delta.safetensors` file: float32 (or float16) tensors keyed by diffusers
UNet parameter names without a `unet.` prefix, each the trained weight minus the base
weight, and safetensors metadata that says what it is (concept, method, resolved config)
and which base model it belongs to (`fmn.model.load.fingerprint`). It refuses to apply to any
other base. Only safetensors is read: nothing is ever unpickled.

Exports turn a patch into LoRA files that other tools load: diffusers/peft
(`pipe.load_lora_weights`) and kohya (AUTOMATIC1111, ComfyUI), by truncated SVD of each
2-D weight delta. Key spellings live in `fmn.model.lora_keys`.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fmn.io import atomic_path
from fmn.manifest import PICKLE_SUFFIXES, refuse_pickle
from fmn.model import lora_keys
from fmn.model.load import fingerprint

PATCH_FILE = "delta.safetensors"
FORMAT = "fmn-patch"
FORMAT_VERSION = 1  # bump when a reader of the old version would misread a new file
KOHYA_DEFAULT_FILE = "lora_kohya.safetensors"
_SHOW_KEYS = 5  # how many offending keys an error lists


class PatchError(ValueError):
    """A patch that cannot be written, read, applied or exported; the message says why."""


class PatchNotFoundError(PatchError, FileNotFoundError):
    """A patch path that does not exist."""


@dataclass
class Patch:
    """Dense UNet weight deltas of one concept (or a comma-joined list, once merged)."""

    concept: str  # concept id, or "a,b,c" for a merged patch
    method: str  # how the deltas were made, e.g. "resteer", "merge:sum"
    deltas: dict[str, torch.Tensor]  # UNet parameter name -> trained minus base, float32
    config: dict = field(default_factory=dict)  # resolved config, JSON-serialisable
    base_fingerprint: str = ""  # fmn.model.load.fingerprint of the base it was made on
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # free metadata, e.g. merged concepts' hashes
    created: str | None = None  # UTC ISO time; set when first saved
    # the gated concepts' text-state eraser (fmn.model.eraser) that came in the patch's folder
    eraser: Any = None

    @property
    def config_hash(self) -> str:
        """sha256 of the canonical JSON of `config`: same settings, same hash."""
        return "sha256:" + hashlib.sha256(_canonical_json(self.config).encode()).hexdigest()[:16]


# ---- file format ---------------------------------------------------------------------


def save_patch(patch: Patch, directory: Path | str, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write `directory/delta.safetensors` atomically and return its path.

    `dtype` float16 halves the file; a delta that overflows float16 is refused. A path that
    ends in `.safetensors` is taken as the file itself.
    """
    if dtype not in (torch.float32, torch.float16):
        raise PatchError(f"patches are stored as float32 or float16, not {dtype}")
    dest = Path(directory)
    if dest.suffix.lower() != ".safetensors":
        dest = dest / PATCH_FILE
    _check_keys(patch)
    tensors = {
        k: patch.deltas[k].detach().to("cpu", dtype).contiguous() for k in sorted(patch.deltas)
    }
    # checked after the cast: float16 turns large finite values into Inf
    _check_finite(
        tensors, patch.concept, hint=" (too large for float16?)" if dtype == torch.float16 else ""
    )
    created = patch.created or datetime.now(UTC).isoformat(timespec="seconds")
    try:
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "concept": patch.concept,
            "method": patch.method,
            "base_fingerprint": patch.base_fingerprint,
            "config": _canonical_json(patch.config),
            "config_hash": patch.config_hash,
            "extra": _canonical_json(patch.extra),
            "created": created,
        }
    except (TypeError, ValueError) as e:
        raise PatchError(f"patch for {patch.concept!r}: config/extra is not JSON: {e}") from e
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    patch.created = created
    return dest


def load_patch(path: Path | str) -> Patch:
    """Read a patch from its folder or its `.safetensors` file; deltas come back float32.
    A folder that also carries gated concepts' eraser (fmn.model.eraser.ERASER_FILE: a
    merge's folder, or `fmn forget` of a gated concept) comes with it, and one that
    carries the eraser alone is a patch that changes no weight."""
    from fmn.model import eraser as gates

    gate_file = Path(path) / gates.ERASER_FILE if Path(path).is_dir() else None
    if gate_file is None or not gate_file.is_file():
        return _load_deltas(path)
    try:
        found = gates.load(gate_file)
    except gates.EraserError as e:
        raise PatchError(str(e)) from e
    if (Path(path) / PATCH_FILE).exists():
        patch = _load_deltas(path)
        patch.eraser = found
        return patch
    return Patch(
        concept=",".join(found.concepts),
        method="gate",
        deltas={},
        config=found.config,
        base_fingerprint=found.config.get("base_fingerprint", ""),
        eraser=found,
    )


def _load_deltas(path: Path | str) -> Patch:
    file = _patch_file(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            _check_format(meta, file)
            deltas = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise PatchError(
            f"{file} is truncated or not a safetensors file ({e}); re-create it, or copy it "
            "again if it came from elsewhere"
        ) from e
    concept = meta.get("concept", "")
    _check_finite(deltas, concept, where=f" in {file}")
    try:
        config, extra = json.loads(meta.get("config", "{}")), json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as e:
        raise PatchError(f"{file}: its config/extra metadata is not valid JSON: {e}") from e
    return Patch(
        concept=concept,
        method=meta.get("method", ""),
        deltas=deltas,
        config=config,
        base_fingerprint=meta.get("base_fingerprint", ""),
        format_version=int(meta["format_version"]),
        extra=extra,
        created=meta.get("created"),
    )


def patch_concept(path: Path | str) -> str:
    """The concept id a patch file is of, from its metadata alone (no tensor is read)."""
    return patch_header(path)[0]


def patch_header(path: Path | str) -> tuple[str, dict]:
    """(concept id, resolved config) of a patch file, from its metadata alone."""
    file = _patch_file(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise PatchError(f"{file} is truncated or not a safetensors file ({e})") from e
    _check_format(meta, file)
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise PatchError(f"{file}: its config metadata is not valid JSON: {e}") from e
    return meta.get("concept", ""), config


def patch_hash(path: Path | str) -> str:
    """sha256 of a patch file's bytes ("sha256:<64 hex>"); accepts the folder or the file."""
    h = hashlib.sha256()
    with open(_patch_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _patch_file(path: Path | str) -> Path:
    file = Path(path)
    refuse_pickle(file, PatchError)
    if file.is_dir():
        file = file / PATCH_FILE
    if not file.is_file():
        raise PatchNotFoundError(f"no patch at {file}")
    if file.suffix.lower() != ".safetensors":
        raise PatchError(f"{file} is not a .safetensors patch file")
    return file


def _check_format(meta: dict[str, str], file: Path) -> None:
    found = meta.get("format")
    if found != FORMAT:
        looks_lora = found == "pt" or lora_keys.PEFT_METADATA_KEY in meta
        hint = (
            " It looks like a LoRA or a model file; load_patch reads patches only."
            if looks_lora
            else ""
        )
        raise PatchError(
            f"{file} is not an fmn patch: its metadata has format={found!r}, expected "
            f"{FORMAT!r}.{hint}"
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise PatchError(f"{file} has no valid format_version in its metadata") from None
    if version > FORMAT_VERSION:
        raise PatchError(
            f"{file} is patch format version {version}, newer than this fmn reads "
            f"({FORMAT_VERSION}); upgrade forget-me-not-pipeline"
        )


def _check_keys(patch: Patch) -> None:
    if not patch.deltas:
        raise PatchError(f"patch for {patch.concept!r} has no deltas")
    prefixed = [k for k in patch.deltas if k.startswith("unet.")]
    if prefixed:
        raise PatchError(
            f"patch for {patch.concept!r}: keys are UNet parameter names without the 'unet.' "
            f"prefix; drop it from {prefixed[:_SHOW_KEYS]}"
        )


def _check_finite(
    tensors: dict[str, torch.Tensor], concept: str, where: str = "", hint: str = ""
) -> None:
    for key in sorted(tensors):
        if not torch.isfinite(tensors[key]).all():
            raise PatchError(
                f"patch for concept {concept!r}{where} has NaN/Inf values in {key}{hint}; "
                "the training that made it diverged, so it is not used"
            )


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


# ---- apply / revert ------------------------------------------------------------------


@dataclass
class _Applied:
    """What apply_patch changed, so that revert_patch can put the exact bits back."""

    deltas: dict[str, torch.Tensor]
    scale: float
    originals: dict[str, torch.Tensor]
    digest: str  # of the touched parameters right after apply


# per UNet, a stack of applied patches; dies with the UNet
_APPLIED: weakref.WeakKeyDictionary[torch.nn.Module, list[_Applied]] = weakref.WeakKeyDictionary()


def apply_patch(
    pipe: DiffusionPipeline,
    patch: Patch,
    scale: float = 1.0,
    *,
    check_base: bool = True,
    keep_original: bool = True,
) -> None:
    """Add `scale * delta` to `pipe.unet`'s parameters in place; all or nothing.

    Everything is checked before any weight changes: the base fingerprint (unless
    `check_base=False`), that every key is a UNet parameter, and the shapes. The sum is
    computed in float32 and cast to the parameter's dtype. With `keep_original` the
    touched weights' old values are kept (as much memory as the patch) so that
    `revert_patch` restores them bit for bit; without it revert subtracts, which is exact
    only up to float rounding (and so may not give back the base's fingerprint).
    """
    if not math.isfinite(scale):
        raise PatchError(f"scale must be finite, got {scale}")
    if check_base:
        actual = fingerprint(pipe)
        if actual != patch.base_fingerprint:
            raise PatchError(
                f"patch for concept {patch.concept!r} was made for base model "
                f"{patch.base_fingerprint or '(unknown)'}, but this model is {actual}; apply "
                "it to the model it was trained on, or pass check_base=False / --force if "
                "you know what you are doing"
            )
    params = _target_params(pipe.unet, patch)
    with torch.no_grad():
        new = {k: _shifted(p, patch.deltas[k], scale) for k, p in params.items()}
        originals = {k: p.detach().clone() for k, p in params.items()} if keep_original else {}
        for k, p in params.items():
            p.copy_(new[k])
    if keep_original:
        record = _Applied(patch.deltas, scale, originals, _digest(params))
        _APPLIED.setdefault(pipe.unet, []).append(record)
    if patch.eraser is not None:
        from fmn.model import eraser as gates

        gates.install(pipe, patch.eraser)


def revert_patch(pipe: DiffusionPipeline, patch: Patch, scale: float = 1.0) -> None:
    """Undo `apply_patch(pipe, patch, scale)`.

    When this is the last patch applied (with `keep_original`) and its weights were not
    changed since, the original values are put back exactly, and so is the fingerprint.
    Otherwise `scale * delta` is subtracted, which is exact up to float rounding.
    """
    if patch.eraser is not None:
        from fmn.model import eraser as gates

        gates.remove(pipe)
    params = _target_params(pipe.unet, patch)
    stack = _APPLIED.get(pipe.unet, [])
    top = stack[-1] if stack else None
    with torch.no_grad():
        if top is not None and _same(top, patch, scale) and _digest(params) == top.digest:
            for k, p in params.items():
                p.copy_(top.originals[k])
            stack.pop()
            return
        for k, p in params.items():
            p.copy_(_shifted(p, patch.deltas[k], -scale))
    # the weights no longer are what any recorded apply left behind
    stack.clear()


def _target_params(unet: torch.nn.Module, patch: Patch) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters a patch touches, after checking every key and shape."""
    own = dict(unet.named_parameters())
    unknown = [k for k in patch.deltas if k not in own]
    if unknown:
        hint = (
            " Keys carry no 'unet.' prefix; drop it."
            if any(k.startswith("unet.") for k in unknown)
            else " Was it made for another model family or architecture?"
        )
        raise PatchError(
            f"patch for concept {patch.concept!r} has {len(unknown)} keys that are not "
            f"parameters of this UNet: {unknown[:_SHOW_KEYS]}.{hint}"
        )
    for k, delta in patch.deltas.items():
        if tuple(delta.shape) != tuple(own[k].shape):
            raise PatchError(
                f"patch for concept {patch.concept!r}: {k} has shape {tuple(delta.shape)} but "
                f"the UNet's parameter has shape {tuple(own[k].shape)}; the patch was made "
                "for another architecture"
            )
    return {k: own[k] for k in patch.deltas}


def _shifted(param: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    # float32 arithmetic even for float16 weights: the deltas are far below fp16's step
    summed = param.detach().float() + scale * delta.to(param.device, torch.float32)
    return summed.to(param.dtype)


def _digest(params: dict[str, torch.nn.Parameter]) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(params[k].detach().to("cpu").contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def _same(record: _Applied, patch: Patch, scale: float) -> bool:
    return (
        record.scale == scale
        and record.deltas.keys() == patch.deltas.keys()
        and all(torch.equal(record.deltas[k], patch.deltas[k]) for k in patch.deltas)
    )


# ---- LoRA exports --------------------------------------------------------------------


@dataclass
class _Factor:
    module: str
    down: torch.Tensor  # A: r x in
    up: torch.Tensor  # B: out x r
    err2: float  # ||delta - B @ A||_F^2 of the float32 factors as written
    norm2: float  # ||delta||_F^2


def export_lora(patch: Patch, path: Path | str, rank: int | None = None) -> dict:
    """Write a diffusers/peft LoRA of the patch (truncated SVD at `rank`; None = full rank).

    `path` is a `.safetensors` file, or a folder that gets `pytorch_lora_weights.safetensors`
    (what `pipe.load_lora_weights(folder)` looks for). Load it with
    `pipe.load_lora_weights(path, adapter_name=patch.concept)`; its scale is exactly 1.
    Returns {"path", "rank", "relative_error", "layers", "skipped"}: relative_error is
    ||delta - B@A||_F / ||delta||_F over all layers together, "layers" the same per module.
    """
    file = _export_file(path, lora_keys.PEFT_DEFAULT_FILE)
    factors, skipped = _factorize(patch, rank)
    fmt = lora_keys.PEFT
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        tensors[fmt.down_key(f.module)] = f.down
        tensors[fmt.up_key(f.module)] = f.up
    ranks = {f.module: f.down.shape[0] for f in factors}
    report = _report(file, factors, skipped)
    meta = {"format": "pt", **lora_keys.peft_adapter_metadata(ranks)}
    _write(file, tensors, meta | _export_metadata(patch, report))
    return report


def export_kohya(patch: Patch, path: Path | str, rank: int | None = None) -> dict:
    """Write a kohya-style LoRA (AUTOMATIC1111, ComfyUI; diffusers loads it too).

    Loaders scale each module by `alpha / rank`. Every module gets the same alpha, the most
    common rank, so with one rank throughout alpha == rank and the scale is 1; a module of
    another rank r has its up matrix multiplied by r / alpha to keep the product exact. (One
    alpha for all is also what kohya-ss trainers write; per-module alphas that differ are
    misread by diffusers 0.42, whose kohya converter keys them under names peft ignores.)
    `path` is a `.safetensors` file (its name is what A1111/ComfyUI show), or a folder that
    gets `lora_kohya.safetensors`. Returns the same report as `export_lora`.
    """
    file = _export_file(path, KOHYA_DEFAULT_FILE)
    factors, skipped = _factorize(patch, rank)
    alpha = Counter(f.down.shape[0] for f in factors).most_common(1)[0][0]
    fmt = lora_keys.KOHYA
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        r = f.down.shape[0]
        tensors[fmt.down_key(f.module)] = f.down
        tensors[fmt.up_key(f.module)] = f.up if r == alpha else f.up * (r / alpha)
        tensors[fmt.alpha_key(f.module)] = torch.tensor(float(alpha))
    report = _report(file, factors, skipped)
    meta = {"format": "pt", **lora_keys.kohya_info_metadata(report["rank"], alpha)}
    _write(file, tensors, meta | _export_metadata(patch, report))
    return report


def not_lora(patch: Patch) -> list[str]:
    """The parameters a patch changes that a LoRA cannot carry: anything but a 2-D Linear
    weight (biases and norms, which `params: attn2` and `params: unet` also train)."""
    return [
        k
        for k, d in sorted(patch.deltas.items())
        if d.count_nonzero() > 0 and (d.ndim != 2 or lora_keys.module_of(k) is None)
    ]


def _factorize(patch: Patch, rank: int | None) -> tuple[list[_Factor], list[str]]:
    """Truncated SVD of every nonzero delta: W = U S Vh, B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r."""
    if rank is not None and rank < 1:
        raise PatchError(f"rank must be a positive integer or None (full rank), got {rank}")
    if patch.eraser is not None:  # a LoRA of the rest would ship without the gated concepts
        raise PatchError(
            f"it carries the gates of {', '.join(patch.eraser.concepts)} (eraser.safetensors), "
            "which act on the text encoder's output and no LoRA holds (hint: ship the model "
            "folder that `fmn apply` writes, or forget them with --erase resteer)"
        )
    _check_keys(patch)
    _check_finite(patch.deltas, patch.concept)
    nonzero = {k: d for k, d in sorted(patch.deltas.items()) if d.count_nonzero() > 0}
    skipped = sorted(set(patch.deltas) - set(nonzero))  # a zero delta changes nothing
    if bad := not_lora(patch):
        shapes = [f"{k} {tuple(nonzero[k].shape)}" for k in bad[:_SHOW_KEYS]]
        raise PatchError(
            f"patch for concept {patch.concept!r} changes {len(bad)} parameters that a "
            f"LoRA cannot carry (only 2-D Linear weights): {shapes}. Use the patch itself or "
            "a merged model, or re-steer with params: to_kv (attn2 and unet also train "
            "biases)."
        )
    if not nonzero:
        raise PatchError(f"patch for concept {patch.concept!r} is all zeros: nothing to export")
    factors = []
    for key, delta in nonzero.items():
        w = delta.to(torch.float64)  # float64 SVD: full rank reproduces the delta to fp32 eps
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = min(rank or len(s), len(s))
        root = s[:r].sqrt()
        up = (u[:, :r] * root).to(torch.float32).contiguous()
        down = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
        err2 = (w - up.double() @ down.double()).pow(2).sum().item()
        factors.append(_Factor(lora_keys.module_of(key), down, up, err2, w.pow(2).sum().item()))
    return factors, skipped


def _report(file: Path, factors: list[_Factor], skipped: list[str]) -> dict:
    err2, norm2 = sum(f.err2 for f in factors), sum(f.norm2 for f in factors)
    return {
        "path": str(file),
        "rank": max(f.down.shape[0] for f in factors),
        "relative_error": math.sqrt(err2 / norm2),
        "layers": {
            f.module: {"rank": f.down.shape[0], "relative_error": math.sqrt(f.err2 / f.norm2)}
            for f in factors
        },
        "skipped": skipped,
    }


def _export_metadata(patch: Patch, report: dict) -> dict[str, str]:
    return {
        "concept": patch.concept,
        "method": patch.method,
        "base_fingerprint": patch.base_fingerprint,
        "rank": str(report["rank"]),
        "relative_error": f"{report['relative_error']:.6g}",
    }


def _export_file(path: Path | str, default_name: str) -> Path:
    file = Path(path)
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise PatchError(
            f"{file}: exports are .safetensors files, not {file.suffix} (a pickle format that "
            "loaders would have to unpickle); name it *.safetensors or give a folder"
        )
    return file if file.suffix.lower() == ".safetensors" else file / default_name


def _write(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
