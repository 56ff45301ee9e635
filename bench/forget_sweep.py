"""Sweep re-steering settings on the embedded world: one target per run, every other
concept measured. Writes bench/results/forget_sweep.json and a markdown table.

The world's classifier only *measures* here; nothing it says feeds the training side.
Usage: python bench/forget_sweep.py --targets triangle checker carol --grid default
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from fmn.data.anchors import anchor_prompts
from fmn.data.prepare import prepare_concept
from fmn.eval.mscore.detectors import WorldDetector
from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
from fmn.model.conditioning import CONCEPT_TEMPLATES, encode_text
from fmn.model.load import load_pipeline
from fmn.train.resteer import resteer, resteer_config_for
from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
from fmn.world.concepts import get_concept, world_concepts

GRIDS = {
    "default": {
        "lr": [1e-4, 1e-3],
        "steps": [35],
        "positions": ["concept", "concept+eot", "all_eot"],
        "preserve_weight": [0.0],
    },
}


@contextmanager
def applied(unet, deltas: dict[str, torch.Tensor]):
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, d in deltas.items():
                params[n].sub_(d)


def world_scores(pipe, detector, prompts: int, seeds: tuple[int, ...]) -> dict:
    refs = [ConceptRef(c.id, c.type, c.text) for c in world_concepts()]
    rows, _ = score_concepts(pipe, refs, detector, prompts_per_concept=prompts, seeds=seeds)
    return summarise(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["triangle", "checker", "carol"])
    ap.add_argument("--grid", default="default")
    ap.add_argument("--grid-json", help="a JSON dict of lists overriding the grid")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default="bench/results/forget_sweep.json")
    ap.add_argument("--mask", default="none", help="none | auto | face | attention")
    ap.add_argument("--extra-templates", nargs="*", default=[], help="TYPE=TEMPLATE, added")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for item in args.extra_templates:
        kind, template = item.split("=", 1)
        CONCEPT_TEMPLATES[kind].append(template)
    pipe = load_pipeline(EMBEDDED_NAME)
    detector = WorldDetector(EMBEDDED_DIR / "classifier")
    seeds = tuple(range(args.seeds))
    base = world_scores(pipe, detector, args.prompts, seeds)
    grid = json.loads(args.grid_json) if args.grid_json else GRIDS[args.grid]
    keys = list(grid)
    rows = []
    for target in args.targets:
        c = get_concept(target)
        data = prepare_concept(pipe, c.id, c.type, c.text, generate=16, mask=args.mask)
        anchors = encode_text(pipe, anchor_prompts({c.text}))
        for values in itertools.product(*(grid[k] for k in keys)):
            cfg = resteer_config_for(c.type, **dict(zip(keys, values, strict=True)))
            t0 = time.time()
            r = resteer(pipe, data, cfg, anchors=anchors)
            with applied(pipe.unet, r.deltas):
                after = world_scores(pipe, detector, args.prompts, seeds)
            ratios = {k: after[k]["mscore"] / max(base[k]["mscore"], 1e-6) for k in base}
            others = {k: v for k, v in ratios.items() if k != target}
            worst = min(others, key=others.get)
            row = {
                "target": target,
                "lr": cfg.lr,
                "steps": cfg.steps,
                "positions": cfg.positions,
                "preserve_weight": cfg.preserve_weight,
                "mask": args.mask,
                "target_base": round(base[target]["mscore"], 3),
                "target_after": round(after[target]["mscore"], 3),
                "target_ratio": round(ratios[target], 3),
                "others_mean_ratio": round(sum(others.values()) / len(others), 3),
                "worst_other": worst,
                "worst_ratio": round(others[worst], 3),
                "attn_before": round(r.attention_before, 4),
                "attn_after": round(r.attention_after, 4),
                "seconds": round(time.time() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": base, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
