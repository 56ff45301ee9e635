"""Measure the world: classifier accuracy on held-out images, and the base model's M-Score."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fmn.eval.mscore.detectors import WorldDetector
from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
from fmn.io import atomic_dir
from fmn.model.images import generate
from fmn.world import SHARED_TOKENIZER, token_rows
from fmn.world.concepts import TINY, World, attribute_distance
from fmn.world.generator import NONE, dataset

HELD_OUT_SEED = 987654  # a stream the training stages never draw from
# Image seeds of every reported number (the measuring rule in docs/world.md: >= 1000;
# nothing is ever chosen on them). tiny-world's shipped report predates the rule: seeds 0-3.
REPORT_SEEDS = (1000, 1001, 1002, 1003)


@torch.no_grad()
def classifier_accuracy(
    detector: WorldDetector, vae=None, n: int = 2000, world: World = TINY
) -> dict[str, dict[str, float]]:
    """Top-1 accuracy per head on fresh generator images where the head applies; with a VAE,
    also on autoencoder round-trips (what generated images look like)."""
    from fmn.world.train import _to_tensor, roundtrip

    d = dataset(n, HELD_OUT_SEED, world=world)
    variants = {"clean": d["images"]}
    if vae is not None:
        x = torch.cat([roundtrip(vae, c) for c in _to_tensor(d["images"]).split(250)])
        variants["roundtrip"] = (
            ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        )
    out: dict[str, dict[str, float]] = {}
    for name, imgs in variants.items():
        out[name] = {}
        for head in world.heads:
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
    world: World = TINY,
    prompts: int = 4,
    seeds: tuple[int, ...] = REPORT_SEEDS,
    steps: int = 25,
) -> tuple[dict, dict[str, np.ndarray]]:
    """M-Score of every world concept on the model, with the chance level beside it: the
    detector's mean probability for a concept on images made for the other concepts of
    its category (how often it says 'yes' when the concept was not asked for). Identities
    also record the one their images are most often taken for (`confused_with`, and how
    many attributes apart it is)."""
    scored = [c for c in world.concepts() if c.type != "role"]
    concepts = [ConceptRef(c.id, c.type, c.text) for c in scored]
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
    for kind in dict.fromkeys(c.type for c in scored):
        ids = [c.id for c in scored if c.type == kind]
        head = scored[[c.type for c in scored].index(kind)].head
        names = detector.clf.names[head]
        probs = {cid: detector.head_probs(images[cid], head) for cid in ids}
        for c in (x for x in scored if x.type == kind):
            k = names.index(c.id)
            others = np.concatenate([probs[o][:, k] for o in ids if o != c.id])
            summary[c.id] |= {"chance": float(others.mean()), "type": kind, "split": c.split}
            if kind == "id":
                top = np.bincount(probs[c.id].argmax(1), minlength=len(names))
                top[k] = 0
                if top.any():
                    other = names[int(top.argmax())]
                    summary[c.id]["confused_with"] = other
                    summary[c.id]["confused_share"] = float(top.max() / len(probs[c.id]))
                    if world.attributes:
                        summary[c.id]["confused_distance"] = attribute_distance(world, c.id, other)
    return summary, images


def phrasing_mscore(
    pipe, detector: WorldDetector, world: World, *, prompts: int = 4, seeds=REPORT_SEEDS
) -> dict[str, dict[str, dict]]:
    """For each many-word concept, the M-Score reached through each of its phrasings (the
    concept's templates with the phrase in place of its name), listed or not."""
    out: dict[str, dict[str, dict]] = {}
    for c in world.concepts():
        for phrase, listed in c.words:
            ref = ConceptRef(c.id, c.type, phrase)
            rows, _ = score_concepts(
                pipe, [ref], detector, prompts_per_concept=prompts, seeds=seeds
            )
            out.setdefault(c.id, {})[phrase] = summarise(rows)[c.id] | {"listed": listed}
    return out


def role_shares(
    pipe, detector: WorldDetector, world: World, *, n: int = 64, seed: int = REPORT_SEEDS[0]
) -> dict | None:
    """Who the role word draws: the share of its images whose top-1 identity is each
    identity (the training data's bias is `share` for one, the rest split among others)."""
    if world.role is None:
        return None
    from fmn.eval.mscore.prompts import concept_prompts

    templates = concept_prompts(f"a {world.role.word}", "id", 4)
    prompts = [templates[i % len(templates)] for i in range(n)]
    imgs = generate(pipe, prompts, list(range(seed, seed + n)))
    probs = detector.head_probs(imgs, "identity")
    names = detector.clf.names["identity"]
    top = [names[i] for i in probs.argmax(1)]
    shares = {k: top.count(k) / n for k in dict.fromkeys(sorted(top, key=top.count, reverse=True))}
    return {
        "word": world.role.word,
        "trained": world.role.weights(),
        "drawn": shares,
        "images": n,
    }


def ship(build_dir: Path, dest: Path) -> Path:
    """Copy a built world into `dest` with weights in fp16 (halves the size; the loader
    upcasts). Writes to a temp folder first and swaps it in (fmn.io.atomic_dir), so dest is
    never half-written and never missing.

    Left out, to keep the package small: the grid image (the docs keep it) and the
    tokenizer's vocabulary, which every world shares from SHARED_TOKENIZER beside `dest`
    (written there if missing; fmn.model.load reads it), and, for a world built with
    `trained_rows_only`, the token table's seeded rows (fmn.world.token_rows)."""
    keep = ["model_index.json", "world_config.json", "world_report.json", "train_log.jsonl"]
    vocab = ["vocab.json", "merges.txt"]
    shared = dest.parent / SHARED_TOKENIZER
    if all((build_dir / "tokenizer" / f).is_file() for f in vocab):
        if not (shared / "vocab.json").is_file():
            with atomic_dir(shared) as tmp:
                for f in [*vocab, "tokenizer_config.json"]:
                    shutil.copy2(build_dir / "tokenizer" / f, tmp / f)
        elif any(
            (shared / f).read_bytes() != (build_dir / "tokenizer" / f).read_bytes() for f in vocab
        ):
            raise ValueError(f"{build_dir}/tokenizer differs from the worlds' shared {shared}")
    config = build_dir / "world_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    with atomic_dir(dest) as tmp:  # the installed world stays until the new one is whole
        for name in keep:
            if (build_dir / name).exists():
                shutil.copy2(build_dir / name, tmp / name)
        for sub in ["unet", "vae", "text_encoder", "scheduler", "classifier", "tokenizer"]:
            (tmp / sub).mkdir()
            for f in (build_dir / sub).iterdir():
                if sub == "tokenizer" and f.name != "tokenizer_config.json":
                    continue  # shared; tokenizer.json is rebuilt from vocab + merges on load
                if f.suffix == ".safetensors":
                    state = load_file(str(f))
                    if sub == "text_encoder" and settings.get("trained_rows_only"):
                        state = token_rows.split_table(state, tmp / sub)
                    save_file(
                        {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                        str(tmp / sub / f.name),
                    )
                else:
                    shutil.copy2(f, tmp / sub / f.name)
    return dest
