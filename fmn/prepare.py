"""Per-concept data prep: training images, VAE latents and text conditioning, computed once
so that a re-steering step runs only the UNet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmn.conditioning import TextConditioning, encode_text

# Prompts that show the concept, per type. Generic English, never the world's labels: the
# same templates serve a real checkpoint.
CONCEPT_TEMPLATES: dict[str, list[str]] = {
    "id": ["a photo of {}", "a portrait of {}", "a picture of {}", "an image of {}"],
    "object": ["a photo of a {}", "a picture of a {}", "an image of a {}", "a photo of the {}"],
    "style": [
        "a picture in the style of {}",
        "an image in the style of {}",
        "a photo in the style of {}",
        "art in the style of {}",
    ],
    "nsfw": ["a photo of {}", "a picture of {}", "an image of {}", "{}"],
}


@dataclass
class Prepared:
    concept_id: str
    concept_type: str
    text: str
    latents: torch.Tensor  # [N, C, h, w], already multiplied by the VAE's scaling factor
    masks: torch.Tensor | None  # [N, h, w] in [0, 1] at latent resolution, or None
    cond: TextConditioning  # the concept prompts, encoded once
    images: np.ndarray | None = None  # uint8 [N, H, W, 3], kept for masks and reports


def concept_prompts(text: str, concept_type: str) -> list[str]:
    return [t.format(text) for t in CONCEPT_TEMPLATES[concept_type]]


@torch.no_grad()
def encode_images(pipe, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> scaled latent means [N, C, h, w] (the mean: deterministic)."""
    vae = pipe.vae
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(vae.dtype).div(127.5).sub(1)
    out = [vae.encode(c.to(vae.device)).latent_dist.mean for c in x.split(batch)]
    return torch.cat(out) * vae.config.scaling_factor


def generate_concept_images(
    pipe, text: str, concept_type: str, n: int, seed: int = 0
) -> np.ndarray:
    """n images of the concept from the base model itself, templates in turn, fixed seeds."""
    from fmn.mscore.score import generate

    prompts = concept_prompts(text, concept_type)
    return generate(
        pipe, [prompts[i % len(prompts)] for i in range(n)], [seed + i for i in range(n)]
    )


def prepare_concept(
    pipe,
    concept_id: str,
    concept_type: str,
    text: str,
    *,
    images: np.ndarray | None = None,
    generate: int = 16,
    masks: np.ndarray | None = None,
    seed: int = 0,
) -> Prepared:
    """Images (given, or generated), their latents, and the concept prompts' conditioning."""
    if images is None:
        images = generate_concept_images(pipe, text, concept_type, generate, seed)
    latents = encode_images(pipe, images)
    lat_masks = None
    if masks is not None:
        m = torch.from_numpy(masks).float()[:, None]
        lat_masks = torch.nn.functional.interpolate(m, size=latents.shape[-2:], mode="area")[:, 0]
    h, w = images.shape[1:3]
    cond = encode_text(pipe, concept_prompts(text, concept_type), image_hw=(h, w))
    return Prepared(concept_id, concept_type, text, latents, lat_masks, cond, images)


def load_image_folder(folder: Path, size: int) -> np.ndarray:
    """Every image of a folder as uint8 [N, size, size, 3]: EXIF orientation honoured,
    any mode converted to RGB, shorter side resized to `size`, centre-cropped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from fmn.manifest import image_files

    files = image_files(Path(folder)) if Path(folder).is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no .jpg/.jpeg/.png/.webp images in this folder")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "LA", "RGBA") else im
                im = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
                out.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from None
    return np.stack(out)
