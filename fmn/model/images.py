"""Pixels in and out of a pipeline: draw images from prompts with fixed seeds, and encode
images into the VAE's scaled latents. Training data (prepare), the merge's judge and the
M-Score all draw and encode through these two functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 25,
    guidance: float = 5.0,
    batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """One image per (prompt, seed) pair, uint8 [N, H, W, 3]; seeds make each reproducible
    whatever the batch it lands in."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch]]
        images = pipe(
            list(prompts[i : i + batch]),
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        if progress:
            progress(min(i + batch, len(prompts)), len(prompts))
    return np.concatenate(out)


@torch.no_grad()
def encode_images(pipe, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> scaled latent means [N, C, h, w] (the mean: deterministic)."""
    vae = pipe.vae
    x = torch.tensor(images).permute(0, 3, 1, 2).to(vae.dtype).div(127.5).sub(1)
    out = [vae.encode(c.to(vae.device)).latent_dist.mean for c in x.split(batch)]
    return torch.cat(out) * vae.config.scaling_factor
