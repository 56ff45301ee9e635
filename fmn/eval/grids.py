"""Labelled image grids (PNG) for people to look at: one row per label."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 110


def labelled_grid(
    rows: Mapping[str, np.ndarray], *, scale: int = 3, per_row: int = 8
) -> Image.Image:
    """rows: label -> uint8 images [N, H, W, 3]; up to `per_row` images per row, upscaled
    with nearest-neighbour so small images stay crisp."""
    first = next(iter(rows.values()))
    h, w = first.shape[1] * scale, first.shape[2] * scale
    canvas = Image.new("RGB", (LABEL_WIDTH + per_row * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows.items()):
        y = r * (h + 2)
        draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
        for k, img in enumerate(images[:per_row]):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + k * (w + 2), y))
    return canvas
