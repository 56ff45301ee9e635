"""Per-concept data prep: training images, masks, VAE latents and text conditioning,
computed once (and cached on disk when asked) so that a re-steering step runs only the UNet.

The cache is keyed by a content hash of everything that shapes the result: the image
pixels (or the generation spec and seed), the concept's text, type and prompt templates,
the mask settings (and user mask pixels), the base model (UNet + text encoders'
fingerprint, the VAE's own hash, the scheduler), and the code: the source of this module
and of every fmn module in its import closure (fmn.code_key). Any change misses; a hit
runs no model.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fmn.code_key import code_key
from fmn.manifest import GENERATED_IMAGES, concept_words
from fmn.model.conditioning import (
    CONCEPT_TEMPLATES,
    TextConditioning,
    concept_prompts,
    encode_text,
)
from fmn.model.images import encode_images, generate

if TYPE_CHECKING:
    from fmn.manifest import ResolvedConcept

CROPS = ("center", "random")
CACHE_FILE, RECORD_FILE = "prep.safetensors", "prep.json"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Prepared:
    concept_id: str
    concept_type: str
    text: str
    latents: torch.Tensor  # [N, C, h, w], already multiplied by the VAE's scaling factor
    masks: torch.Tensor | None  # [N, h, w] in [0, 1] at latent resolution, or None
    cond: TextConditioning  # the concept prompts, encoded once
    images: np.ndarray | None = None  # uint8 [N, H, W, 3], kept for masks and reports
    record: dict = field(default_factory=dict)  # how it was made: source, masks, cache
    words: tuple[str, ...] = ()  # every phrasing of the concept, text first; () is (text,)

    def __post_init__(self) -> None:
        self.words = concept_words(self.text, self.words)


def generate_concept_images(
    pipe, text: str | Sequence[str], concept_type: str, n: int, seed: int = 0
) -> np.ndarray:
    """n images of the concept (or of each of its words in turn) from the base model
    itself, templates in turn, fixed seeds."""
    return draw_images(pipe, concept_prompts(text, concept_type), n, seed)


def draw_images(pipe, prompts: Sequence[str], n: int, seed: int = 0) -> np.ndarray:
    """n images from the base model, the prompts in turn, seeds seed, seed + 1, ..."""
    return generate(
        pipe, [prompts[i % len(prompts)] for i in range(n)], [seed + i for i in range(n)]
    )


# ---------------------------------------------------------------------------------------
# Image folders


@dataclass
class LoadedImages:
    pixels: np.ndarray  # uint8 [N, size, size, 3]
    files: list[Path]
    boxes: list[tuple[float, float, float, float]]  # crop taken from each oriented image
    sizes: list[tuple[int, int]]  # (W, H) of each oriented image


def _to_rgb(im):
    """Any PIL mode -> RGB: 16-bit scaled down (a plain convert clips it to white),
    transparency composited on white (a cut-out's hidden pixels are arbitrary)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F" and a.max() <= 1:
            top = 1.0
        im = Image.fromarray((np.clip(a / top, 0, 1) * 255).round().astype(np.uint8))
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _crop_box(w: int, h: int, crop: str, rng: np.random.Generator) -> tuple[float, ...]:
    side = min(w, h)
    if crop == "center":
        x, y = (w - side) / 2, (h - side) / 2
    else:
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return (x, y, x + side, y + side)


def folder_images(folder: Path) -> list[Path]:
    """The images of a folder; fails when there are none, before any image is decoded."""
    from fmn.manifest import image_files

    folder = Path(folder)
    files = image_files(folder) if folder.is_dir() else []
    if not files:
        what = "has no .jpg/.jpeg/.png/.webp images" if folder.is_dir() else "is not a folder"
        raise FileNotFoundError(f"{folder} {what}")
    return files


def load_images(folder: Path, size: int, *, crop: str = "center", seed: int = 0) -> LoadedImages:
    """Every image of a folder as uint8 [N, size, size, 3]: EXIF orientation honoured, any
    mode converted to RGB, the largest square (centre, or random with `seed`) resized."""
    from PIL import Image, ImageOps

    from fmn.manifest import IMAGE_HINT, image_problem

    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    files = folder_images(folder)
    # headers first, so that a non-image or a decompression bomb fails before any decoding
    for f in files:
        if (why := image_problem(f)) is not None:
            raise ValueError(f"{f}: not a readable image: {why} (hint: {IMAGE_HINT})")
    rng = np.random.default_rng(seed)
    out, boxes, sizes = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()  # decode now, so a truncated file fails here with its name
                im = _to_rgb(ImageOps.exif_transpose(im))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{f}: not a readable image ({e}) (hint: {IMAGE_HINT})") from None
        box = _crop_box(im.width, im.height, crop, rng)
        out.append(np.asarray(im.resize((size, size), Image.Resampling.LANCZOS, box=box)))
        boxes.append(box)
        sizes.append(im.size)
    return LoadedImages(np.stack(out).astype(np.uint8), files, boxes, sizes)


def load_image_folder(
    folder: Path, size: int, *, crop: str = "center", seed: int = 0
) -> np.ndarray:
    """Every image of a folder as uint8 [N, size, size, 3] (see load_images)."""
    return load_images(folder, size, crop=crop, seed=seed).pixels


# ---------------------------------------------------------------------------------------
# Cache


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _array_hash(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return _sha(f"{a.dtype}{a.shape}".encode(), a.tobytes())


def _module_hash(module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _model_spec(pipe) -> dict:
    """What of the base model shapes a prep: weights, and how generation samples."""
    from fmn.model.load import fingerprint, model_family

    return {
        "fingerprint": fingerprint(pipe),
        "vae": _module_hash(pipe.vae),  # the fingerprint leaves the VAE out; latents need it
        "family": model_family(pipe),
        "dtype": str(pipe.unet.dtype),
        "scheduler": [type(pipe.scheduler).__name__, dict(pipe.scheduler.config)],
    }


def _mask_spec(mode: str, concept_type: str, no_face: str) -> dict:
    from fmn.data import masks as m

    if mode == "auto":
        mode = "face" if concept_type == "id" else "attention"
    spec: dict = {"mode": mode}
    if mode == "face":
        spec["face"] = [m.DETECT_MIN_SIDE, m.FACE_MIN_CONFIDENCE, "ellipse", 0.15, "largest"]
        spec["no_face"] = no_face
    if mode == "attention" or (mode == "face" and no_face == "attention"):
        spec["attention"] = [
            list(m.ATTENTION_TIMESTEPS),
            m.ATTENTION_SPATIAL,
            m.ATTENTION_COLOUR,
            m.ATTENTION_THRESHOLD,
            m.ATTENTION_DILATE,
            m.REFINE_MAX_SIDE,
        ]
    return spec


def _cache_dir(cache_dir: Path, concept_id: str, key: str) -> Path:
    if not _SAFE_ID.fullmatch(concept_id) or ".." in concept_id:
        raise ValueError(f"concept id {concept_id!r} cannot name a cache folder")
    return Path(cache_dir) / concept_id / key[:16]


def _save_cache(where: Path, data: Prepared, key: str, mask_images: np.ndarray | None) -> None:
    from safetensors.torch import save_file

    from fmn.data.masks import save_mask_pngs
    from fmn.io import atomic_path, write_json

    tensors = {"latents": data.latents, "cond.input_ids": data.cond.input_ids}
    tensors["cond.embeds"] = data.cond.embeds
    if data.cond.pooled is not None:
        tensors["cond.pooled"], tensors["cond.time_ids"] = data.cond.pooled, data.cond.time_ids
    if data.masks is not None:
        tensors["masks"] = data.masks
    if data.images is not None:
        tensors["images"] = torch.from_numpy(data.images)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    names = [p["name"] for p in data.record["masks"]["per_image"]]
    if mask_images is not None:  # for a person to look at; the loss reads the tensors
        save_mask_pngs(mask_images, where / "masks", names)
    with atomic_path(where / CACHE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key})
    # the record goes last: it marks the entry complete, so a crash before it is a miss
    write_json(where / RECORD_FILE, {**data.record, "key": key, "eos_id": data.cond.eos_id})


def _load_cache(pipe, where: Path, key: str) -> tuple[dict, dict] | None:
    from safetensors import SafetensorError, safe_open

    try:
        record = json.loads((where / RECORD_FILE).read_text())
        if record.get("key") != key:
            return None
        with safe_open(str(where / CACHE_FILE), framework="pt") as f:
            if f.metadata().get("key") != key:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError, SafetensorError):  # missing or damaged: recompute
        return None
    return record, tensors


def _from_cache(pipe, concept_id, concept_type, words, record, tensors) -> Prepared:
    dev, dtype = pipe.unet.device, pipe.unet.dtype
    cond = TextConditioning(
        prompts=record["prompts"],
        input_ids=tensors["cond.input_ids"],
        embeds=tensors["cond.embeds"].to(dev, dtype),
        pooled=tensors["cond.pooled"].to(dev, dtype) if "cond.pooled" in tensors else None,
        time_ids=tensors["cond.time_ids"].to(dev, dtype) if "cond.time_ids" in tensors else None,
        eos_id=record["eos_id"],
    )
    images = tensors["images"].numpy() if "images" in tensors else None
    return Prepared(
        concept_id,
        concept_type,
        words[0],
        tensors["latents"].to(pipe.vae.device, pipe.vae.dtype),
        tensors.get("masks"),
        cond,
        images,
        {**record, "cache": "hit"},
        words,
    )


# ---------------------------------------------------------------------------------------
# Prepare


def prepare_concept(
    pipe,
    concept_id: str,
    concept_type: str,
    text: str,
    *,
    images: np.ndarray | Path | str | None = None,
    generate: int = GENERATED_IMAGES,
    masks: np.ndarray | None = None,
    seed: int = 0,
    mask: str | Path = "none",
    image_names: list[str] | None = None,
    crop: str = "center",
    no_face: str = "attention",
    cache_dir: Path | None = None,
    words: Sequence[str] | None = None,
    draw_from: Sequence[str] = (),
) -> Prepared:
    """Images (an array, a folder, or `generate` from the base model), their latents, masks
    and the concept prompts' conditioning; with `cache_dir`, loaded from there when nothing
    that shapes them changed (see the module docstring). words: every phrasing that
    reaches the concept (`text` first if missing): prompts and generated images cycle
    over them. draw_from: prompts to generate the images from instead, in turn (a
    correction's guide, fmn.train.correct); the concept's prompts are still its own.

    mask: none | auto | face | attention | a Path to a folder of user masks (see
    fmn.data.masks.concept_masks); `masks` passes ready-made [N, H, W] masks instead. None by
    default here, the building block that does what it is told (and that ready-made
    `masks` need); every way to build a patch (a manifest, `fmn forget`,
    fmn.train.forget.forget_concept) passes the manifest's default, auto.
    """
    from fmn.data.masks import MASK_MODES, concept_masks, load_user_masks
    from fmn.model.load import model_info

    t0 = time.time()
    if concept_type not in CONCEPT_TEMPLATES:
        raise ValueError(
            f"concept type must be one of {list(CONCEPT_TEMPLATES)}, got {concept_type!r}"
        )
    if masks is not None and mask != "none":
        raise ValueError("pass either ready-made masks or a mask mode, not both")
    if isinstance(mask, str) and mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES} or a folder Path, got {mask!r}")
    if isinstance(images, str | Path):
        folder_images(Path(images))  # an empty folder fails before any model work
    size = model_info(pipe).sample_size
    crops = sizes = None
    if isinstance(images, str | Path):
        source: dict = {"folder": str(images), "crop": crop}
        loaded = load_images(Path(images), size, crop=crop, seed=seed)
        images, crops, sizes = loaded.pixels, loaded.boxes, loaded.sizes
        image_names = [f.name for f in loaded.files]
    elif images is not None:
        if len(images) == 0:
            raise ValueError(f"concept {concept_id!r}: no training images")
        source = {"array": len(images)}
    else:
        source = {"generate": generate, "seed": seed}
        if draw_from:
            source["from"] = list(draw_from)
    n = len(images) if images is not None else generate
    if image_names is None:
        image_names = [f"{i:04d}" for i in range(n)]
    if len(image_names) != n:
        raise ValueError(f"{len(image_names)} image names for {n} images")
    if masks is not None and (images is None or masks.shape != images.shape[:3]):
        got = getattr(masks, "shape", None)
        raise ValueError(f"masks must be [N, H, W] like the images' {n} x H x W, got {got}")
    if isinstance(mask, Path):
        if images is None:
            raise ValueError("user masks need image files to match by name, not generated images")
        hw = images.shape[1:3]
        masks = load_user_masks(mask, image_names, hw, crops, sizes)
        mask_spec: dict = {"mode": "user", "folder": str(mask)}
    elif masks is not None:
        mask_spec = {"mode": "given"}
    else:
        mask_spec = _mask_spec(mask, concept_type, no_face)
    phrasings = concept_words(text, words)
    prompts = concept_prompts(phrasings, concept_type)
    spec = {
        "code": code_key(__name__),  # the source of prepare and every fmn module it imports
        "type": concept_type,
        "text": text,
        "words": phrasings,
        "prompts": prompts,
        "source": {k: v for k, v in source.items() if k != "folder"},  # pixels, not paths
        "images": _array_hash(images) if images is not None else None,
        "masks": mask_spec,
        "mask_pixels": _array_hash(masks) if masks is not None else None,
        "model": _model_spec(pipe) if cache_dir is not None else None,
    }
    key = _sha(json.dumps(spec, sort_keys=True, default=str).encode())
    where = _cache_dir(cache_dir, concept_id, key) if cache_dir is not None else None
    if where is not None and (hit := _load_cache(pipe, where, key)) is not None:
        return _from_cache(pipe, concept_id, concept_type, phrasings, *hit)

    if images is None and draw_from:
        images = draw_images(pipe, draw_from, generate, seed)
    elif images is None:
        images = generate_concept_images(pipe, phrasings, concept_type, generate, seed)
    latents = encode_images(pipe, images)
    if masks is not None:
        mask_record = {
            "mode": mask_spec["mode"],
            "per_image": [{"name": s, "method": mask_spec["mode"]} for s in image_names],
        }
        if "folder" in mask_spec:
            mask_record["folder"] = mask_spec["folder"]
    else:
        masks, mask_record = concept_masks(
            pipe,
            images,
            phrasings,
            concept_type,
            mask,
            image_names=image_names,
            latents=latents,
            no_face=no_face,
        )
    lat_masks = None
    if masks is not None:
        m = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
        lat_masks = torch.nn.functional.interpolate(m, size=latents.shape[-2:], mode="area")[:, 0]
    h, w = images.shape[1:3]
    cond = encode_text(pipe, prompts, image_hw=(h, w))
    record = {
        "concept": {"id": concept_id, "type": concept_type, "text": text, "words": phrasings},
        "source": source,
        "images": len(images),
        "names": image_names,
        "prompts": prompts,
        "masks": mask_record,
        "model": spec["model"],
        "seconds": round(time.time() - t0, 3),
        "cache": "miss" if where is not None else "off",
        "key": key,  # names the cache entry (a hit's record carries it too)
    }
    # Contiguous, as a cache hit loads them. The VAE hands back a channels-last layout, which
    # the UNet's convolutions round differently (~1e-5 in a patch): without this, a concept
    # prepared without the cache (`fmn forget`) trained apart from one read from it (`fmn
    # run`). After the masks, which keep the values they always had.
    latents = latents.contiguous()
    data = Prepared(
        concept_id, concept_type, text, latents, lat_masks, cond, images, record, phrasings
    )
    if where is not None:
        _save_cache(where, data, key, masks)
    return data


def prepare_resolved(
    pipe, r: ResolvedConcept, *, mask: str | Path = "none", cache_dir: Path | None = None
) -> Prepared:
    """prepare_concept for a manifest's resolved concept: its images (or `generate` of
    them) drawn with its re-steering seed. A correction (`action: correct`) takes its
    guide's images instead, a folder's or drawn from its prompts in turn, with its
    correction seed and no masks (the whole image is what the word should draw)."""
    if r.action == "correct":
        folder = r.guide_images
        return prepare_concept(
            pipe,
            r.id,
            r.type,
            r.text,
            images=folder_images_at(pipe, folder) if folder else None,
            generate=r.correct.generate,
            seed=r.correct.seed,
            cache_dir=cache_dir,
            words=r.words,
            draw_from=r.guide_prompts,
        )
    return prepare_concept(
        pipe,
        r.id,
        r.type,
        r.text,
        images=r.images,
        generate=r.generate or GENERATED_IMAGES,  # None: images from a folder, unused
        seed=r.resteer.seed,
        mask=mask,
        cache_dir=cache_dir,
        words=r.words,
    )


def folder_images_at(pipe, folder: Path) -> np.ndarray:
    """A folder's images, whole, at the model's size (centre crops), uint8 [N, H, W, 3]."""
    from fmn.model.load import model_info

    return load_images(Path(folder), model_info(pipe).sample_size).pixels
