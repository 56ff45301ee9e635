"""Measure the world: classifier accuracy on held-out images, and the base model's M-Score."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fmn.mscore.detectors import WorldDetector
from fmn.mscore.score import ConceptRef, score_concepts, summarise
from fmn.world.concepts import HEADS, world_concepts
from fmn.world.generator import NONE, dataset

HELD_OUT_SEED = 987654  # a stream the training stages never draw from


@torch.no_grad()
def classifier_accuracy(
    detector: WorldDetector, vae=None, n: int = 2000
) -> dict[str, dict[str, float]]:
    """Top-1 accuracy per head on fresh generator images where the head applies; with a VAE,
    also on autoencoder round-trips (what generated images look like)."""
    from fmn.world.train import _to_tensor, roundtrip

    d = dataset(n, HELD_OUT_SEED)
    variants = {"clean": d["images"]}
    if vae is not None:
        x = torch.cat([roundtrip(vae, c) for c in _to_tensor(d["images"]).split(250)])
        variants["roundtrip"] = (
            ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        )
    out: dict[str, dict[str, float]] = {}
    for name, imgs in variants.items():
        out[name] = {}
        for head in HEADS:
            y = d["labels"][head]
            keep = y != NONE
            pred = detector.head_probs(imgs[keep], head).argmax(1)
            out[name][head] = float((pred == y[keep]).mean())
    return out


def base_mscore(
    pipe,
    detector: WorldDetector,
    progress: Callable[[int, int], None] | None = None,
    *,
    prompts: int = 4,
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    steps: int = 25,
) -> tuple[dict, dict[str, np.ndarray]]:
    """M-Score of every world concept on the model, with the chance level beside it: the
    detector's mean probability for a concept on images made for the other concepts of
    its category (how often it says 'yes' when the concept was not asked for)."""
    concepts = [ConceptRef(c.id, c.type, c.text) for c in world_concepts()]
    rows, images = score_concepts(
        pipe,
        concepts,
        detector,
        prompts_per_concept=prompts,
        seeds=seeds,
        steps=steps,
        progress=progress,
    )
    summary = summarise(rows)
    for c in concepts:
        others = np.concatenate(
            [images[o.id] for o in concepts if o.type == c.type and o.id != c.id]
        )
        prob, _ = detector.score(others, c.id, c.type)
        summary[c.id]["chance"] = float(prob.mean())
        summary[c.id]["type"] = c.type
    return summary, images


def ship(build_dir: Path, dest: Path) -> Path:
    """Copy a built world into `dest` with weights in fp16 (halves the size; the loader
    upcasts). Writes to a temp folder first and swaps it in, so dest is never half-written."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    keep = [
        "model_index.json",
        "world_config.json",
        "world_report.json",
        "train_log.jsonl",
        "grid.png",
    ]
    tmp.mkdir(parents=True)
    for name in keep:
        if (build_dir / name).exists():
            shutil.copy2(build_dir / name, tmp / name)
    for sub in ["unet", "vae", "text_encoder", "scheduler", "classifier", "tokenizer"]:
        (tmp / sub).mkdir()
        for f in (build_dir / sub).iterdir():
            if f.name == "tokenizer.json":
                continue  # rebuilt from vocab.json + merges.txt on load; saves 3.6 MB
            if f.suffix == ".safetensors":
                state = load_file(str(f))
                save_file(
                    {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                    str(tmp / sub / f.name),
                )
            else:
                shutil.copy2(f, tmp / sub / f.name)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
