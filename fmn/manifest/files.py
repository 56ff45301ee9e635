"""What a manifest's fields check on disk before any work starts: image folders (every
file decoded, decompression bombs refused) and base-model paths (pickles refused)."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _base_dir(info: ValidationInfo) -> Path:
    """Where relative paths start: the manifest's folder (load_manifest), else the cwd."""
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd()).resolve()


def _resolve(path: Path, base_dir: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def image_files(folder: Path) -> list[Path]:
    """The images of a folder (not its subfolders) that the pipeline reads, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# PIL's own limit (about 9459 x 9459). A bigger image is a decompression bomb (a tiny file
# that claims to decode to gigabytes) or a scan no model needs: every image is resized to
# the model's few hundred pixels anyway.
MAX_IMAGE_PIXELS = 89_478_485
IMAGE_HINT = "delete it or re-save it as PNG, JPEG or WebP (any bit depth or colour mode)"
_SHOW_BAD = 3  # how many unusable images a message lists


class ImageFolderError(ValueError):
    """A folder of images that cannot be used: `msg` names the folder or file, `hint` says
    what to do."""

    def __init__(self, kind: str, msg: str, hint: str) -> None:
        self.kind, self.msg, self.hint = kind, msg, hint
        super().__init__(f"{msg} (hint: {hint})")


def image_problem(path: Path, *, deep: bool = False) -> str | None:
    """Why `path` is not a usable image, or None. From the header alone (cheap): not an
    image, or more than MAX_IMAGE_PIXELS. With `deep`, the pixels are decoded too (JPEGs at
    1/8 scale), which finds truncated and corrupt data. Results are cached per file version."""
    try:
        st = Path(path).stat()
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    return _image_problem(str(path), st.st_mtime_ns, st.st_size, deep)


@functools.lru_cache(maxsize=65536)
def _image_problem(path: str, mtime_ns: int, size: int, deep: bool) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return (
                        f"it claims {w} x {h} px, more than the limit of {MAX_IMAGE_PIXELS:,} "
                        "px (a decompression bomb?); it was not decoded"
                    )
                if deep:
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # JPEG: decode small
                    im.load()
    except Image.DecompressionBombError as e:
        return f"too many pixels to decode safely ({e}); it was not decoded"
    except UnidentifiedImageError:
        return "not an image (no PNG/JPEG/WebP/... header)"
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's decoders raise these
        return f"corrupt or truncated image data ({e})"
    return None


def check_image_folder(folder: Path, *, deep: bool = False) -> list[Path]:
    """The images of `folder`; raises ImageFolderError when it is missing, has no images, or
    holds an image that cannot be used (see image_problem), naming the files."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ImageFolderError("folder_missing", f"folder {folder} {what}", "check the path")
    files = image_files(folder)
    if not files:
        msg = f"folder {folder} has no {'/'.join(IMAGE_SUFFIXES)} files"
        hint = "add images to it, or use {generate: N} to have the base model draw them"
        raise ImageFolderError("folder_empty", msg, hint)
    bad = [(f, why) for f in files if (why := image_problem(f, deep=deep)) is not None]
    if bad:
        listed = "; ".join(f"{f.name}: {why}" for f, why in bad[:_SHOW_BAD])
        more = f" (and {len(bad) - _SHOW_BAD} more)" if len(bad) > _SHOW_BAD else ""
        msg = f"{len(bad)} of {len(files)} images in {folder} cannot be used: {listed}{more}"
        raise ImageFolderError("bad_image", msg, IMAGE_HINT)
    return files


def _check_folder(path: Path, info: ValidationInfo) -> Path:
    """Fail now, not hours into a run, if a folder of images is missing, empty, or holds a
    file that is not a usable image (headers only, unless the context asks verify_images)."""
    base = _base_dir(info)
    where = _resolve(path, base)
    deep = bool((info.context or {}).get("verify_images"))
    try:
        check_image_folder(where, deep=deep)
    except ImageFolderError as e:
        hint = f"relative paths start at the manifest's folder {base}"
        hint = hint if e.kind == "folder_missing" else e.hint
        raise PydanticCustomError(e.kind, "{msg}", {"msg": e.msg, "hint": hint}) from None
    return path


ImageFolder = Annotated[Path, AfterValidator(_check_folder)]

# Checkpoint suffixes that are Python pickles: loading one can run arbitrary code, so no
# fmn reader opens them (models, patches, TI files): each calls refuse_pickle first.
PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"})


def refuse_pickle(path: Path, error: type[Exception], what: str = "read") -> None:
    """Raise `error` when `path` is a pickle file, before anything opens it: the one
    refusal every reader of user files (models, patches, TI files) gives."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise error(
            f"refusing to {what} {path}: {path.suffix} files are Python pickles, and loading "
            "one can run arbitrary code; we never unpickle. Convert it to .safetensors in a "
            "sandbox you trust (load it there, then save it with safetensors.torch.save_file) "
            "and pass the .safetensors file instead."
        )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as fmn.model.load reads it
MODEL_HINT = (
    "use a diffusers pipeline folder, a .safetensors checkpoint, a hub id (org/name) or "
    "embedded:tiny-world"
)


def _check_model_spec(spec: str, info: ValidationInfo) -> str:
    """What can be told about a base model without loading it: a pickle is refused, a
    local path must exist (relative to the manifest's folder or the cwd) and be a pipeline
    folder or a .safetensors file. Anything else must look like a hub id."""
    if spec.startswith("embedded:"):
        return spec  # fmn.model.load says how to build a missing one
    path = Path(spec).expanduser()

    def fail(kind: str, msg: str, hint: str = MODEL_HINT) -> PydanticCustomError:
        return PydanticCustomError(kind, "{msg}", {"msg": msg, "hint": hint})

    if path.suffix.lower() in PICKLE_SUFFIXES:
        msg = f"{spec} is a Python pickle ({path.suffix}): loading one can run arbitrary code"
        hint = "convert it to .safetensors in a sandbox you trust and point base_model there"
        raise fail("model_pickle", msg, hint)
    base = _base_dir(info)
    where = next((p for p in (_resolve(path, base), path) if p.exists()), None)
    if where is None:
        if _HUB_ID.fullmatch(spec) and not spec.startswith((".", "~")):
            return spec  # a hub id: only loading can tell
        msg = f"model path {_resolve(path, base)} does not exist"
        raise fail("model_missing", msg, f"{MODEL_HINT}; relative paths start at {base}")
    if where.is_dir() and not (where / "model_index.json").is_file():
        raise fail(
            "model_folder", f"{where} is not a diffusers pipeline folder (no model_index.json)"
        )
    if where.is_file() and where.suffix.lower() != ".safetensors":
        raise fail("model_file", f"{where} is a file but not a .safetensors checkpoint")
    return spec


ModelSpec = Annotated[str, Field(min_length=1), AfterValidator(_check_model_spec)]
