"""Where the concept is in each training image: face masks (MTCNN), masks from the base
model's own cross-attention, and user masks. Re-steering then suppresses attention only on
those pixels (the loss resizes a mask to every cross-attention resolution).

Every mask is float32 (H, W) in [0, 1] at the image's resolution, 1 where the concept is.
Nothing here reads the embedded world's labels or ground-truth masks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from fmn.model.attention import AttentionStore, capture_cross_attention, token_weights

MASK_MODES = ("auto", "face", "attention", "none")
FACE_SHAPES = ("ellipse", "box")
FACE_POLICIES = ("largest", "all")

# MTCNN's smallest face is 20 px (min_face_size); a face in a 32 px image is smaller, so
# small images are upscaled until their shorter side has this many pixels.
DETECT_MIN_SIDE = 160
# MTCNN's last stage keeps boxes above 0.7; above 0.9 drops most false faces in textures.
FACE_MIN_CONFIDENCE = 0.9

# Attention masks. Chosen on a tuning split of the world and measured on a held-out one
# (bench/masks.py, docs/masks.md); nothing in them is specific to the world.
ATTENTION_TIMESTEPS = (50, 100, 300, 500, 700, 900)  # low t sees edges, high t the layout
ATTENTION_SPATIAL = 0.5  # refinement: spatial sigma as a fraction of the image's side
ATTENTION_COLOUR = 0.03  # refinement: colour sigma, RGB in [0, 1]
ATTENTION_THRESHOLD = "otsu"  # or a float in (0, 1): a fraction of the map's range
ATTENTION_DILATE = 0.0  # grow the mask by this fraction of the side (0: as thresholded)
REFINE_MAX_SIDE = 64  # refinement cost grows with pixels^2; 64 px keeps it ~0.1 s/image


class NoFaceError(ValueError):
    """MTCNN found no face in an image."""


# ---------------------------------------------------------------------------------------
# Face masks


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the image's pixels
    landmarks: np.ndarray | None  # [5, 2] (x, y): eyes, nose, mouth corners
    confidence: float


@functools.lru_cache(maxsize=1)
def _detector():
    from facenet_pytorch import MTCNN  # weights ship in its wheel; imported only when used

    return MTCNN(keep_all=True, device="cpu")


def detect_faces(image: Image.Image, *, min_confidence: float = FACE_MIN_CONFIDENCE) -> list[Face]:
    """Every face MTCNN finds, in the image's own coordinates, most confident first."""
    image = image.convert("RGB")
    scale = max(1.0, DETECT_MIN_SIDE / min(image.size))
    if scale > 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC)
    with torch.no_grad():
        boxes, probs, points = _detector().detect(image, landmarks=True)
    if boxes is None:
        return []
    faces = [
        Face(tuple(float(v) / scale for v in b), np.asarray(p) / scale, float(c))
        for b, c, p in zip(boxes, probs, points, strict=True)
        if c >= min_confidence
    ]
    return sorted(faces, key=lambda f: -f.confidence)


def _face_region(face: Face, hw: tuple[int, int], shape: str, dilate: float) -> np.ndarray:
    x1, y1, x2, y2 = face.box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    a, b = (x2 - x1) / 2 * (1 + dilate), (y2 - y1) / 2 * (1 + dilate)
    ys, xs = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32) + 0.5  # pixel centres
    if shape == "box":
        return ((abs(xs - cx) <= a) & (abs(ys - cy) <= b)).astype(np.float32)
    angle = 0.0
    if face.landmarks is not None:  # tilt the ellipse with the line through the eyes
        (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
        angle = math.atan2(ry - ly, rx - lx)
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * (xs - cx) + s * (ys - cy), -s * (xs - cx) + c * (ys - cy)
    return ((u / a) ** 2 + (v / b) ** 2 <= 1).astype(np.float32)


def face_mask(
    image: Image.Image,
    *,
    shape: str = "ellipse",
    dilate: float = 0.15,
    policy: str = "largest",
) -> np.ndarray:
    """(H, W) float32 mask of the face(s) MTCNN finds: an ellipse in the box (tilted with
    the eyes) or the box itself, each half-axis grown by `dilate`. policy "largest" keeps
    the largest face, "all" the union. Raises NoFaceError when there is no face."""
    if shape not in FACE_SHAPES:
        raise ValueError(f"shape must be one of {FACE_SHAPES}, got {shape!r}")
    if policy not in FACE_POLICIES:
        raise ValueError(f"policy must be one of {FACE_POLICIES}, got {policy!r}")
    faces = detect_faces(image)
    if not faces:
        raise NoFaceError(
            f"no face found in this {image.width}x{image.height} image; use mask 'attention' "
            "or 'none' for this concept, or give a folder of masks"
        )
    if policy == "largest":
        faces = [max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))]
    hw = (image.height, image.width)
    return np.maximum.reduce([_face_region(f, hw, shape, dilate) for f in faces])


# ---------------------------------------------------------------------------------------
# Attention masks


class _ShareStore(AttentionStore):
    """Records, per attn2 call, the concept's share of the attention that each pixel pays
    to the prompt's words: [B, Nq]. The share, not the raw mass, because start-of-text
    soaks up most attention everywhere (an attention sink) and hides where the words go."""

    def __init__(self) -> None:
        super().__init__()
        self.words: torch.Tensor | None = None  # [B, T], 1 between start and end of text

    def record(self, probs: torch.Tensor, heads: int) -> None:
        bh, nq, t = probs.shape
        p = probs.view(bh // heads, heads, nq, t).mean(1)
        concept = p @ self.token_weights.to(p)[:, :, None]
        words = p @ self.words.to(p)[:, :, None]
        self.maps.append((concept / words.clamp(min=1e-6))[..., 0])


def _word_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    out = torch.zeros(input_ids.shape)
    for b, row in enumerate(input_ids.tolist()):
        end = row.index(eos_id) if eos_id in row else len(row)
        out[b, 1:end] = 1
    return out


@torch.no_grad()
def attention_share_maps(
    pipe,
    latents: torch.Tensor,
    text: str | Sequence[str],  # a concept's words: every phrasing counts
    concept_type: str,
    *,
    timesteps: Sequence[int] = ATTENTION_TIMESTEPS,
    seed: int = 0,
    batch: int = 16,
) -> torch.Tensor:
    """[N, len(timesteps), h, w] at latent resolution: the concept's share of word attention,
    averaged over heads, the concept's prompts and layers (each layer upsampled and weighted
    by its number of pixels, so the finer layers, which localise best, count most)."""
    from fmn.model.conditioning import concept_prompts, encode_text, words_token_ids

    n, _, h, w = latents.shape
    vae_f = pipe.vae_scale_factor
    cond = encode_text(pipe, concept_prompts(text, concept_type), image_hw=(h * vae_f, w * vae_f))
    concept = token_weights(
        cond.input_ids, words_token_ids(pipe.tokenizer, text), eos_id=cond.eos_id
    )
    words = _word_positions(cond.input_ids, cond.eos_id)
    n_prompts = len(cond.prompts)
    pairs_img = torch.arange(n).repeat_interleave(n_prompts)
    pairs_txt = torch.arange(n_prompts).repeat(n)
    # one noise for every image, drawn per timestep: a mask never depends on its batch
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn((1, *latents.shape[1:]), generator=gen) for _ in timesteps]
    # a fresh DDPM schedule of the model's betas: the pipeline's own scheduler may hold a
    # few inference timesteps from the last generation, and add_noise would not find ours
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    dev, dtype = unet.device, unet.dtype
    store = _ShareStore()
    store.latent_hw = (h, w)
    out = torch.zeros(len(pairs_img), len(timesteps), h, w)
    with capture_cross_attention(unet, store):
        for k, (t, noise) in enumerate(zip(timesteps, noises, strict=True)):
            for s in range(0, len(pairs_img), batch):
                ii, jj = pairs_img[s : s + batch], pairs_txt[s : s + batch]
                tt = torch.full((len(ii),), int(t))
                lat = latents[ii].float().cpu()
                noisy = sched.add_noise(lat, noise.expand_as(lat), tt)
                embeds, kwargs = cond.select(jj)
                store.reset()
                store.token_weights, store.words = concept[jj], words[jj]
                unet(noisy.to(dev, dtype), tt.to(dev), encoder_hidden_states=embeds, **kwargs)
                acc, total = 0.0, 0
                for m in store.maps:
                    lh, lw = store.layer_hw(m.shape[-1])
                    m = m.float().cpu().view(-1, 1, lh, lw)
                    up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                    acc, total = acc + up[:, 0] * lh * lw, total + lh * lw
                out[s : s + len(ii), k] = acc / total
    return out.view(n, n_prompts, len(timesteps), h, w).mean(1)


def _normalise(m: torch.Tensor) -> torch.Tensor:
    lo = m.flatten(-2).min(-1).values[..., None, None]
    hi = m.flatten(-2).max(-1).values[..., None, None]
    return (m - lo) / (hi - lo).clamp(min=1e-8)


@functools.lru_cache(maxsize=4)
def _squared_distances(rh: int, rw: int) -> torch.Tensor:
    """[P, P] squared distances between pixel positions, in units of the longer side."""
    ys, xs = torch.meshgrid(torch.arange(rh), torch.arange(rw), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float() / max(rh, rw)
    return torch.cdist(pos, pos).pow(2)


def refine(coarse: torch.Tensor, image: np.ndarray, spatial: float, colour: float) -> torch.Tensor:
    """Joint bilateral upsampling (Kopf et al. 2007) of a coarse [h, w] map to the image,
    at most REFINE_MAX_SIDE px: each pixel takes the map's average over pixels that are
    near it and of similar colour, so the mask snaps to the edges that the image has."""
    hgt, wid = image.shape[:2]
    f = min(1.0, REFINE_MAX_SIDE / max(hgt, wid))
    rh, rw = max(1, round(hgt * f)), max(1, round(wid * f))
    img = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(rh, rw), mode="area")[0].flatten(1).T  # [P, 3]
    m = F.interpolate(coarse[None, None].float(), size=(rh, rw), mode="bilinear")
    logits = _squared_distances(rh, rw) / (-2 * spatial**2)
    logits -= torch.cdist(img, img).pow(2) / (2 * colour**2)
    out = torch.softmax(logits, dim=1) @ m.flatten()
    return out.view(rh, rw)


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The threshold that best splits values in [0, 1] into two classes (Otsu 1979)."""
    hist, edges = np.histogram(values, bins, (0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    if not np.isfinite(between).any():
        return 0.5
    # the threshold lies between the two classes: the upper edge of the lower one
    return float(edges[int(np.nanargmax(between)) + 1])


def _binarise(
    m: torch.Tensor, hw: tuple[int, int], threshold: str | float, dilate: float
) -> np.ndarray:
    m = _normalise(m)
    cut = otsu_threshold(m.numpy()) if threshold == "otsu" else float(threshold)
    mask = (m >= cut).float()[None, None]
    mask = (F.interpolate(mask, size=hw, mode="bilinear", align_corners=False) >= 0.5).float()
    r = round(dilate * max(hw))
    if r > 0:
        mask = F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r)
    return mask[0, 0].numpy()


def masks_from_maps(
    maps: torch.Tensor,
    images: np.ndarray,
    *,
    spatial: float = ATTENTION_SPATIAL,
    colour: float = ATTENTION_COLOUR,
    threshold: str | float = ATTENTION_THRESHOLD,
    dilate: float = ATTENTION_DILATE,
) -> np.ndarray:
    """Coarse maps [N, h, w] + uint8 images [N, H, W, 3] -> binary masks [N, H, W]:
    normalise to [0, 1], refine with the image, threshold (Otsu, or a fraction of the
    range), dilate by `dilate` of the side."""
    if not (threshold == "otsu" or 0 < float(threshold) < 1):
        raise ValueError(f"threshold must be 'otsu' or a number in (0, 1), got {threshold!r}")
    out = []
    for m, image in zip(_normalise(maps), images, strict=True):
        r = refine(m, image, spatial, colour) if spatial > 0 else m
        out.append(_binarise(r, image.shape[:2], threshold, dilate))
    return np.stack(out).astype(np.float32)


def _as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.asarray(image, dtype=np.uint8)


def attention_masks(
    pipe,
    images: np.ndarray,
    text: str | Sequence[str],  # a concept's words: every phrasing counts
    concept_type: str = "object",
    *,
    latents: torch.Tensor | None = None,
    timesteps: Sequence[int] = ATTENTION_TIMESTEPS,
    threshold: str | float = ATTENTION_THRESHOLD,
    seed: int = 0,
) -> np.ndarray:
    """Attention masks [N, H, W] of N uint8 images [N, H, W, 3] at the model's resolution
    (pass their `latents` when they are already encoded)."""
    from fmn.model.images import encode_images

    if latents is None:
        latents = encode_images(pipe, images)
    maps = attention_share_maps(pipe, latents, text, concept_type, timesteps=timesteps, seed=seed)
    return masks_from_maps(maps.mean(1), images, threshold=threshold)


def attention_mask(
    pipeline,
    image: Image.Image | np.ndarray,
    text: str,
    *,
    concept_type: str = "object",
    timesteps: Sequence[int] = ATTENTION_TIMESTEPS,
    threshold: str | float = ATTENTION_THRESHOLD,
    seed: int = 0,
) -> np.ndarray:
    """(H, W) mask of where the base model itself attends to `text` in `image`.

    The image is encoded, noised at `timesteps` (fixed seed) and run through the UNet with
    the concept's prompts; the concept's share of word attention is averaged over heads,
    prompts, layers and timesteps, refined with the image's colours and thresholded. Any
    image size: it is resized to the model's native size and the mask back to the image's.
    """
    from fmn.model.load import model_info

    pixels = _as_uint8(image)
    size = model_info(pipeline).sample_size
    native = pixels
    if pixels.shape[:2] != (size, size):
        native = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS))
    mask = attention_masks(
        pipeline,
        native[None],
        text,
        concept_type,
        timesteps=timesteps,
        threshold=threshold,
        seed=seed,
    )[0]
    if mask.shape != pixels.shape[:2]:
        hw = pixels.shape[:2]
        up = F.interpolate(torch.from_numpy(mask)[None, None], size=hw, mode="bilinear")
        mask = (up[0, 0] >= 0.5).float().numpy()
    return mask


# ---------------------------------------------------------------------------------------
# User masks


def mask_to_unit(im: Image.Image) -> np.ndarray:
    """A mask image as float32 (H, W) in [0, 1]: its alpha channel when it has a varying one
    (a cut-out), else its grey level; 16-bit images scaled, not clipped."""
    if "A" in im.getbands():
        alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255
        if alpha.min() < alpha.max():
            return alpha
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float32)
        return np.clip(a / (65535.0 if im.mode != "I" or a.max() > 255 else 255.0), 0, 1)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0, 1)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255


def match_user_masks(folder: Path, image_names: Sequence[str | Path]) -> list[Path]:
    """The mask file for each image, matched by file stem ('cat.jpg' <- 'cat.png')."""
    from fmn.manifest import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {folder} does not exist")
    by_stem: dict[str, list[Path]] = {}
    for f in image_files(folder):
        by_stem.setdefault(f.stem, []).append(f)
    out = []
    for name in image_names:
        found = by_stem.get(Path(name).stem, [])
        if not found:
            raise FileNotFoundError(
                f"no mask for image {name} in {folder}: add {Path(name).stem}.png (white where "
                "the concept is)"
            )
        if len(found) > 1:
            raise ValueError(f"image {name} has several masks in {folder}: {found}; keep one")
        out.append(found[0])
    return out


def load_user_masks(
    folder: Path,
    image_names: Sequence[str | Path],
    hw: tuple[int, int],
    crops: Sequence[tuple[float, float, float, float]] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """User masks [N, H, W] in [0, 1], cropped like their images: `crops` are the boxes
    taken from each (oriented) image of size `image_sizes` (W, H); a mask of another size
    is stretched to its image first. Without crops: the same centre crop as the images."""
    from PIL import ImageOps

    files = match_user_masks(folder, image_names)
    out = []
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                m = Image.fromarray(mask_to_unit(im))  # float32 -> mode F
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{f}: not a readable mask image ({e})") from None
        # BOX: a pixel of the small mask is the share of the concept in its area
        if crops is not None:
            if image_sizes is not None and m.size != tuple(image_sizes[i]):
                m = m.resize(tuple(image_sizes[i]), Image.Resampling.BOX)
            m = m.resize((hw[1], hw[0]), Image.Resampling.BOX, box=crops[i])
        else:
            m = ImageOps.fit(m, (hw[1], hw[0]), Image.Resampling.BOX)
        out.append(np.clip(np.asarray(m, dtype=np.float32), 0, 1))
    return np.stack(out)


# ---------------------------------------------------------------------------------------
# Per concept


def concept_masks(
    pipe,
    images: np.ndarray,
    text: str | Sequence[str],  # a concept's words: every phrasing counts
    concept_type: str,
    mode: str | Path,
    *,
    user_folder: Path | None = None,
    image_names: Sequence[str] | None = None,
    latents: torch.Tensor | None = None,
    no_face: str = "attention",
    crops: Sequence[tuple[float, float, float, float]] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> tuple[np.ndarray | None, dict]:
    """Masks [N, H, W] for a concept's images and a record of how each was made.

    mode: auto (face for type id, attention otherwise), face, attention, none, or a Path of
    a user mask folder (same as user_folder). With face, an image without a face takes
    `no_face`: "attention" or "none" (the whole image); the record says which and why.
    """
    if isinstance(mode, Path):
        mode, user_folder = "user", mode
    elif user_folder is not None:
        mode = "user"
    if mode not in (*MASK_MODES, "user"):
        raise ValueError(f"mask must be one of {MASK_MODES} or a folder, got {mode!r}")
    if no_face not in ("attention", "none"):
        raise ValueError(f"no_face must be 'attention' or 'none', got {no_face!r}")
    n, hgt, wid = images.shape[:3]
    names = list(image_names) if image_names is not None else [f"{i:04d}" for i in range(n)]
    if mode == "auto":
        mode = "face" if concept_type == "id" else "attention"
    record: dict = {"mode": mode, "per_image": []}
    if mode == "none":
        record["per_image"] = [{"name": s, "method": "none"} for s in names]
        return None, record
    if mode == "user":
        record["folder"] = str(user_folder)
        masks = load_user_masks(user_folder, names, (hgt, wid), crops, image_sizes)
        record["per_image"] = [{"name": s, "method": "user"} for s in names]
        return masks, record
    masks = np.ones((n, hgt, wid), np.float32)
    methods = ["attention"] * n
    reasons: list[str | None] = [None] * n
    if mode == "face":
        for i, image in enumerate(images):
            try:
                masks[i] = face_mask(Image.fromarray(image))
                methods[i] = "face"
            except NoFaceError:
                methods[i], reasons[i] = no_face, "no face found"
    todo = [i for i, m in enumerate(methods) if m == "attention"]
    if todo:
        lat = latents[todo] if latents is not None else None
        masks[todo] = attention_masks(pipe, images[todo], text, concept_type, latents=lat)
    for s, m, r in zip(names, methods, reasons, strict=True):
        record["per_image"].append({"name": s, "method": m, **({"reason": r} if r else {})})
    record["counts"] = {m: methods.count(m) for m in sorted(set(methods))}
    return masks, record


def save_mask_pngs(masks: np.ndarray, folder: Path, names: Sequence[str]) -> list[Path]:
    """Write each mask as an 8-bit greyscale PNG `folder/<name>.png` (atomic writes)."""
    from fmn.io import write_with

    folder = Path(folder)
    paths = []
    for m, name in zip(masks, names, strict=True):
        path = folder / f"{Path(name).stem}.png"
        img = Image.fromarray((np.clip(m, 0, 1) * 255).round().astype(np.uint8))
        write_with(path, lambda p, img=img: img.save(p, format="PNG"))
        paths.append(path)
    return paths
