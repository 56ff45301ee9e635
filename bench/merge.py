"""Mass removal on the embedded world: joint re-steering vs sum vs closed-form merge.

For N = 1, 4, 8, 16 target concepts (mixed types) and 8 preserved concepts that are never
targeted, in one run: Acc_e (mean world-detector top-1 accuracy on the targets, next to
the base model's), Acc_s ratio (mean accuracy on the preserved concepts / base), the wall
time and peak memory of the merge (for joint: the joint training run, which is its merge).
Writes bench/results/merge.json and merge.md.

The world's classifier measures and feeds no loss; the forgetting side sees concept texts, the
manifest's preserve list and images the base model draws.
Usage: python bench/merge.py [--n 1 4 8 16] [--prompts 4] [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from bench.common import PeakRSS, git_commit
from fmn.eval.mscore.detectors import WorldDetector
from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
from fmn.merge.fuse import MergeConfig, merge_patches
from fmn.model.load import load_pipeline
from fmn.model.patch import Patch, apply_patch, revert_patch, save_patch
from fmn.train.forget import forget_concept, forget_joint
from fmn.train.resteer import resteer_config_for
from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
from fmn.world.concepts import get_concept

PRESERVED = ["alice", "eve", "circle", "star", "arrow", "flat", "dots", "shadow"]
# interleaved so every prefix mixes identities, objects and styles
TARGETS = [
    "carol", "triangle", "outline", "bob", "square", "gradient", "dave", "heart",
    "night", "frank", "cross", "checker", "grace", "crescent", "stripes", "heidi",
]  # fmt: skip


def accuracies(pipe, detector, ids: list[str], prompts: int, seeds: int) -> dict[str, float]:
    refs = [ConceptRef(c.id, c.type, c.text) for c in map(get_concept, ids)]
    rows, _ = score_concepts(
        pipe, refs, detector, prompts_per_concept=prompts, seeds=tuple(range(seeds))
    )
    return {k: v["acc"] for k, v in summarise(rows).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--methods", nargs="+", default=["joint", "sum", "closed-form"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--patches", default="build/merge_bench/patches")
    ap.add_argument("--preserve-weight", type=float, default=MergeConfig.preserve_weight)
    ap.add_argument("--ridge", type=float, default=MergeConfig.ridge)
    ap.add_argument(
        "--erase-to",
        default=MergeConfig.erase_to,
        help="target of the erase term of 'closed-form~g' methods: anchor | removed",
    )
    ap.add_argument(
        "--choose-anchors",
        action="store_true",
        help="erase term: anchors picked by the base model's own judgement "
        "(fmn.merge.anchor_check)",
    )
    ap.add_argument("--overshoot", type=float, default=MergeConfig.overshoot)
    ap.add_argument("--out", default="bench/results/merge.json")
    ap.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="TYPE:key=value re-steering settings for the per-concept patches, e.g. "
        "id:positions=all_eot id:preserve_weight=1 (use another --patches folder)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(EMBEDDED_NAME)
    detector = WorldDetector(EMBEDDED_DIR / "classifier")
    preserve = [(get_concept(c).text, get_concept(c).type) for c in PRESERVED]
    targets = TARGETS[: max(args.n)]

    # one patch per target, made alone (the input of sum and closed-form), cached on disk
    folder = Path(args.patches)
    for cid in targets:
        if not (folder / cid / "delta.safetensors").exists():
            c = get_concept(cid)
            cfg = _config(c.type, args.override)
            res = forget_concept(pipe, c.id, c.type, c.text, cfg, preserve=preserve, mask="none")
            save_patch(res.patch, folder / cid)
            print(f"patch {cid}: {res.resteer.seconds:.1f} s", flush=True)

    t0 = time.time()
    base = accuracies(pipe, detector, targets + PRESERVED, args.prompts, args.seeds)
    print(f"base scored in {time.time() - t0:.0f} s: {json.dumps(base)}", flush=True)
    base_s = sum(base[c] for c in PRESERVED) / len(PRESERVED)
    rows = []
    for n in args.n:
        chosen = targets[:n]
        for method in args.methods:
            with PeakRSS() as mem:
                t = time.time()
                if method == "joint":
                    patch = _joint(pipe, chosen, preserve)
                else:
                    # "closed-form@0.1": another preserve_weight; "closed-form~1": erase 1;
                    # "closed-form:tune": weights picked by the base model (fmn.merge.self_audit)
                    name, _, mode = method.partition(":")
                    name, _, erase = name.partition("~")
                    name, _, alpha = name.partition("@")
                    cfg = MergeConfig(
                        method=name,
                        preserve_weight=float(alpha) if alpha else args.preserve_weight,
                        ridge=args.ridge,
                        erase_weight=float(erase) if erase else 0.0,
                        erase_to=args.erase_to,
                        choose_anchors=args.choose_anchors,
                        overshoot=args.overshoot,
                        tune=mode == "tune",
                    )
                    files = [folder / c for c in chosen]
                    patch = merge_patches(pipe, files, cfg, preserve=preserve).patch
                seconds = time.time() - t
            apply_patch(pipe, patch)
            try:
                acc = accuracies(pipe, detector, chosen + PRESERVED, args.prompts, args.seeds)
            finally:
                revert_patch(pipe, patch)
            row = {
                "method": method,
                "n_targets": n,
                "acc_e": round(sum(acc[c] for c in chosen) / n, 4),
                "acc_e_base": round(sum(base[c] for c in chosen) / n, 4),
                "acc_s_ratio": round(sum(acc[c] for c in PRESERVED) / len(PRESERVED) / base_s, 4),
                "seconds": round(seconds, 3),
                "peak_mb": round(mem.mb, 1),
                "kept": patch.extra.get("kept"),
                "tuning": patch.extra.get("tuning", []),
                "anchors": {
                    c["type"]: c["anchor"]
                    for c in patch.extra.get("anchor_checks", [])
                    if c["chosen"]
                },
                "per_concept_acc": {k: round(v, 3) for k, v in acc.items()},
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_concept_acc"}), flush=True)
    _write(Path(args.out), rows, base, args)


def _joint(pipe, chosen: list[str], preserve) -> Patch:
    concepts = [(c.id, c.type, c.text) for c in map(get_concept, chosen)]
    return forget_joint(
        pipe, concepts, [resteer_config_for(c[1]) for c in concepts], preserve=preserve
    )


def _config(kind: str, overrides: list[str]):
    """Per-type defaults, then TYPE:key=value overrides (numbers parsed as floats/ints)."""
    given: dict = {}
    for item in overrides:
        target, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        if target == kind:
            given[key] = value if not value.replace(".", "").isdigit() else float(value)
    if "steps" in given:
        given["steps"] = int(given["steps"])
    return resteer_config_for(kind, **given)


def _write(out: Path, rows: list[dict], base: dict, args) -> None:
    commit = git_commit()
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "preserved": PRESERVED,
        "targets": TARGETS,
        "prompts_per_concept": args.prompts,
        "seeds": args.seeds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # the file is a list of rows (other tools read it as such); run facts ride on each row
    out.write_text(json.dumps([{**r, **meta} for r in rows], indent=2) + "\n")
    lines = [
        "| method | N | Acc_e | Acc_e base | Acc_s ratio | H | seconds | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h = _harmonic(1 - r["acc_e"], r["acc_s_ratio"])
        lines.append(
            f"| {r['method']} | {r['n_targets']} | {r['acc_e']:.3f} | {r['acc_e_base']:.3f} | "
            f"{r['acc_s_ratio']:.3f} | {h:.3f} | {r['seconds']:.2f} | {r['peak_mb']:.0f} |"
        )
    facts = (
        f"{meta['machine']}, {meta['threads']} thread(s), commit {commit}; "
        f"{args.prompts} prompts x {args.seeds} seeds per concept; preserved: "
        f"{', '.join(PRESERVED)}; base top-1 accuracy: "
        + ", ".join(f"{k} {v:.2f}" for k, v in base.items())
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n\n" + facts + "\n")
    print("\n".join(lines))


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


if __name__ == "__main__":
    main()
