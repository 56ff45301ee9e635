"""Exported LoRA vs the patch on the embedded world: do they draw the same images, and
what does a rank-r export lose? Writes bench/results/lora_world.json.

Usage: python bench/lora_world.py --patch build/carol
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from fmn.model.images import generate
from fmn.model.load import load_pipeline
from fmn.model.patch import apply_patch, export_lora, load_patch
from fmn.world import EMBEDDED_NAME

PROMPTS = ["a photo of carol", "a photo of a red star", "a picture in the style of dots"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", required=True)
    ap.add_argument("--out", default="bench/results/lora_world.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    patch = load_patch(args.patch)
    prompts, seeds = PROMPTS * 4, [s for s in range(4) for _ in PROMPTS]
    pipe = load_pipeline(EMBEDDED_NAME)
    apply_patch(pipe, patch)
    patched = generate(pipe, prompts, seeds).astype(np.int16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (1, 2, 4, 8, None):
            report = export_lora(patch, Path(tmp) / f"r{rank}.safetensors", rank)
            lora_pipe = load_pipeline(EMBEDDED_NAME)
            lora_pipe.load_lora_weights(
                tmp, weight_name=f"r{rank}.safetensors", adapter_name=patch.concept
            )
            images = generate(lora_pipe, prompts, seeds).astype(np.int16)
            diff = np.abs(images - patched)
            rows.append(
                {
                    "rank": report["rank"],
                    "relative_error": report["relative_error"],
                    "max_abs_pixel_diff": int(diff.max()),
                    "mean_abs_pixel_diff": float(diff.mean()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"patch": str(args.patch), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
