"""Masked vs unmasked re-steering on the embedded world, side by side in ONE run.

Per target (objects and styles): the training images are generated once by the base model
and shared by every arm; each arm is `fmn.train.forget.forget_concept` with the type's defaults
(`fmn.train.resteer.resteer_config_for`), `mask: none` or `mask: attention`, and a training seed
(`ResteerConfig.seed`: which images, prompts, timesteps and noise each step draws). Two
training seeds per mask give the run-to-run noise; the comparison is paired (same target,
same seed, same images, same scoring prompts and seeds).

Every patch is scored with the world detector on the target and on a fixed set of concepts
that are never targeted (every identity, object and style of the world except the
targets). The world's classifier measures here: nothing it says feeds a loss, a mask
or a setting. The attention masks come from the base model's own cross-attention.

Usage: python bench/masks_resteer.py [--targets triangle square outline dots]
       [--train-seeds 0 1 2] [--prompts 4] [--seeds 6]   (~37 min on 1 CPU thread)
       [--invert]   (textual inversion first, masked in the masked arm: ~48 min)
then:  python bench/masks_resteer.py --scale-check   (detector-free loss scales, ~30 s)
Writes bench/results/masks_resteer.json and masks_resteer.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_commit, machine, markdown_table, write_results
from bench.forget_sweep import applied  # the deltas added to the UNet for a block
from bench.resteer import score  # world-detector M-Scores of a list of concept ids

N_IMAGES = 16
MASKS = ("none", "attention")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["triangle", "square", "outline", "dots"])
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=6, help="scoring seeds per prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--params", default="to_kv", help="trained parameters (fmn.train.resteer.PARAM_PATTERNS)"
    )
    ap.add_argument(
        "--lr",
        nargs="*",
        default=[],
        help="TYPE=value learning rates instead of the defaults, e.g. object=4.5e-4",
    )
    ap.add_argument(
        "--background-weight",
        type=float,
        default=0.0,
        help="masked arm only: ResteerConfig.background_weight (hold outside the mask)",
    )
    ap.add_argument(
        "--invert",
        action="store_true",
        help="textual inversion first (fmn.train.invert defaults), masked in the masked arm",
    )
    ap.add_argument("--out", default="bench/results/masks_resteer.json")
    ap.add_argument(
        "--scale-check",
        action="store_true",
        help="only the detector-free loss-scale check, added to an existing --out",
    )
    ap.add_argument(
        "--resummarise", action="store_true", help="recompute summary and tables of --out"
    )
    args = ap.parse_args()
    if args.scale_check:
        return scale_check(args)
    if args.resummarise:  # post-processing only: the stored rows, summarised again
        result = json.loads(Path(args.out).read_text())
        seeds = result["settings"]["train_seeds"]
        result["summary"] = summarise(result["rows"], result["targets"], seeds)
        print(write(Path(args.out), result))
        return None

    from fmn.data.prepare import generate_concept_images
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.model.load import load_pipeline
    from fmn.train.forget import forget_concept
    from fmn.train.invert import InvertConfig
    from fmn.train.resteer import resteer_config_for
    from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
    from fmn.world.concepts import get_concept, world_concepts

    torch.set_num_threads(args.threads)
    t_start, commit = time.time(), git_commit()  # the code this run loaded
    pipe = load_pipeline(EMBEDDED_NAME)
    detector = WorldDetector(EMBEDDED_DIR / "classifier")
    others = [c.id for c in world_concepts() if c.id not in args.targets]
    measured = [*args.targets, *others]
    base = score(pipe, detector, measured, args.prompts, args.seeds)
    print("base", json.dumps({k: round(v, 3) for k, v in base.items()}), flush=True)

    lrs = {k: float(v) for k, v in (x.split("=", 1) for x in args.lr)}
    rows = []
    for target in args.targets:
        c = get_concept(target)
        images = generate_concept_images(pipe, c.text, c.type, N_IMAGES)  # shared by all arms
        for seed in args.train_seeds:
            for mask in MASKS:
                cfg = resteer_config_for(
                    c.type,
                    seed=seed,
                    params=args.params,
                    lr=lrs.get(c.type),
                    background_weight=args.background_weight if mask != "none" else 0.0,
                )
                t0 = time.time()
                ti = InvertConfig(seed=seed) if args.invert else None
                res = forget_concept(
                    pipe, c.id, c.type, c.text, cfg, invert_cfg=ti, images=images, mask=mask
                )
                train_s = time.time() - t0
                with applied(pipe.unet, res.patch.deltas):
                    after = score(pipe, detector, measured, args.prompts, args.seeds)
                ratios = {k: after[k] / max(base[k], 1e-6) for k in measured}
                mine = {k: ratios[k] for k in others}
                worst = min(mine, key=mine.get)
                record = res.patch.config.get("mask_record") or {}
                row = {
                    "target": target,
                    "type": c.type,
                    "mask": mask,
                    "train_seed": seed,
                    "target_base": round(base[target], 3),
                    "target_after": round(after[target], 3),
                    "target_ratio": round(ratios[target], 3),
                    "others_mean_ratio": round(statistics.fmean(mine.values()), 4),
                    "worst_other": worst,
                    "worst_ratio": round(mine[worst], 3),
                    "attn_before": round(res.resteer.attention_before, 4),
                    "attn_after": round(res.resteer.attention_after, 4),
                    "mask_methods": record.get("counts"),
                    "seconds": round(time.time() - t0, 1),
                    "train_seconds": round(train_s, 1),
                    "ti_final_loss": round(res.ti.losses[-1], 4) if res.ti else None,
                    "ratios": {k: round(v, 4) for k, v in ratios.items()},
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ratios"}), flush=True)

    summary = summarise(rows, args.targets, args.train_seeds)
    result = {
        "rows": rows,
        "summary": summary,
        "base_mscore": base,
        "targets": args.targets,
        "others": others,
        "settings": {
            "training_images": N_IMAGES,
            "train_seeds": args.train_seeds,
            "score_prompts": args.prompts,
            "score_seeds": args.seeds,
            # each arm inverts with its training seed; the rest are these defaults
            "invert": asdict(InvertConfig()) if args.invert else None,
            "resteer": {
                t: asdict(
                    resteer_config_for(
                        get_concept(t).type,
                        params=args.params,
                        lr=lrs.get(get_concept(t).type),
                        background_weight=args.background_weight,
                    )
                )
                for t in args.targets
            },
        },
        "machine": machine(args.threads),
        "threads": args.threads,
        "commit": commit,
        "wall_seconds": round(time.time() - t_start, 1),
    }
    print(write(Path(args.out), result))


COLS = [
    "target",
    "type",
    "mask",
    "train_seed",
    "target_base",
    "target_after",
    "target_ratio",
    "others_mean_ratio",
    "worst_other",
    "worst_ratio",
    "seconds",
]


def write(out: Path, result: dict) -> str:
    """The JSON and the markdown tables (with the loss-scale check when there is one)."""
    summary = result["summary"]
    table = markdown_table(result["rows"], COLS) + "\n" + markdown_table(summary["per_target"])
    facts = {**summary["overall"], **summary.get("diagnostics", {})}
    table += "\n" + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n"
    if "per_other_concept" in summary:
        table += "\n" + markdown_table(summary["per_other_concept"])
    if "loss_scale" in result:
        title = "## Loss scale at the start (detector-free)"
        table += f"\n{title}\n\n" + markdown_table(result["loss_scale"]["rows"])
    write_results(out, result, table, "Masked vs unmasked re-steering (one run)")
    return table


def _losses(store, masks) -> dict[str, torch.Tensor]:
    """The unmasked loss, the masked one (fmn.model.attention.attention_loss), and the masked
    integrand averaged over ALL pixels (the alternative normalisation: zero outside the
    mask, divide by the image), plus the share of squared attention inside the mask."""
    from fmn.model.attention import attention_loss, resize_masks

    sums, inside = [], []
    for m in store.maps:
        w = resize_masks(masks, store.layer_hw(m.shape[-1]))[:, None, :]
        sums.append((m.pow(2) * w).mean())
        inside.append(((m.pow(2) * w).sum() / m.pow(2).sum()).detach())
    return {
        "unmasked": attention_loss(store),
        "masked": attention_loss(store, masks),
        "all_pixels": torch.stack(sums).mean().sqrt(),
        "inside_share": torch.stack(inside).mean(),
    }


def scale_check(args, batches: int = 8) -> None:
    """Detector-free: at the start of re-steering (base model, each target's own training
    batches drawn as resteer draws them), how large is the masked loss and its gradient
    next to the unmasked one? The preservation weights were set for the unmasked loss, so a
    mask should change which pixels count, not how hard the attention term pulls."""
    from diffusers import DDPMScheduler

    from fmn.data.prepare import generate_concept_images, prepare_concept
    from fmn.model.attention import AttentionStore, capture_cross_attention, token_weights
    from fmn.model.conditioning import concept_token_ids
    from fmn.model.load import load_pipeline
    from fmn.train.resteer import _unet_step, resteer_config_for, select_params
    from fmn.world import EMBEDDED_NAME
    from fmn.world.concepts import get_concept

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(EMBEDDED_NAME)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = select_params(pipe.unet, "to_kv")
    out = []
    for target in args.targets:
        c = get_concept(target)
        cfg = resteer_config_for(c.type)
        images = generate_concept_images(pipe, c.text, c.type, N_IMAGES)
        data = prepare_concept(pipe, c.id, c.type, c.text, images=images, mask="attention")
        ids = concept_token_ids(pipe.tokenizer, data.text)
        weights = token_weights(data.cond.input_ids, ids, cfg.positions, eos_id=data.cond.eos_id)
        store = AttentionStore()
        store.latent_hw = tuple(data.latents.shape[-2:])
        gen = torch.Generator().manual_seed(cfg.seed)
        acc: dict[str, list[float]] = {}
        for p in params.values():
            p.requires_grad_(True)
        try:
            with capture_cross_attention(pipe.unet, store):
                for _ in range(batches):
                    n = cfg.batch
                    idx_img = torch.randint(0, len(data.latents), (n,), generator=gen)
                    idx_txt = torch.randint(0, len(data.cond.prompts), (n,), generator=gen)
                    t = torch.randint(cfg.t_min, cfg.t_max, (n,), generator=gen)
                    noise = torch.randn(data.latents[idx_img].shape, generator=gen)
                    store.reset()
                    store.token_weights = weights[idx_txt]
                    _unet_step(pipe.unet, sched, data, idx_img, idx_txt, t, noise)
                    losses = _losses(store, data.masks[idx_img])
                    grads = {}
                    for k in ("unmasked", "masked", "all_pixels"):
                        g = torch.autograd.grad(
                            losses[k], list(params.values()), retain_graph=True, allow_unused=True
                        )
                        grads[k] = torch.cat([x.flatten() for x in g if x is not None])
                    vals = {
                        "loss_masked_over_unmasked": losses["masked"] / losses["unmasked"],
                        "loss_all_pixels_over_unmasked": losses["all_pixels"] / losses["unmasked"],
                        "grad_masked_over_unmasked": grads["masked"].norm()
                        / grads["unmasked"].norm(),
                        "grad_all_pixels_over_unmasked": grads["all_pixels"].norm()
                        / grads["unmasked"].norm(),
                        "grad_cosine_masked_unmasked": torch.nn.functional.cosine_similarity(
                            grads["masked"], grads["unmasked"], dim=0
                        ),
                        "inside_share": losses["inside_share"],
                        "mask_area": data.masks[idx_img].mean(),
                    }
                    for k, v in vals.items():
                        acc.setdefault(k, []).append(float(v.detach()))
        finally:
            for p in params.values():
                p.requires_grad_(False)
        row = {"target": target, "type": c.type, "positions": cfg.positions}
        row |= {k: round(statistics.fmean(v), 3) for k, v in acc.items()}
        out.append(row)
        print(json.dumps(row), flush=True)
    path = Path(args.out)
    result = json.loads(path.read_text()) if path.is_file() else {}
    result["loss_scale"] = {"batches_per_target": batches, "rows": out}
    path.write_text(json.dumps(result, indent=2) + "\n")
    md = path.with_suffix(".md")
    head = md.read_text().split("\n## Loss scale")[0] if md.is_file() else ""
    md.write_text(
        head.rstrip("\n")
        + "\n\n## Loss scale at the start (detector-free)\n\n"
        + markdown_table(out)
    )


def summarise(rows: list[dict], targets: list[str], seeds: list[int]) -> dict:
    """Paired differences masked - unmasked (same target, same training seed) and the
    run-to-run noise: the spread of one arm over training seeds."""

    def get(t, m, s, k):
        return next(r[k] for r in rows if (r["target"], r["mask"], r["train_seed"]) == (t, m, s))

    per_target, diffs, seed_gaps = [], [], []
    for t in targets:
        d = [
            get(t, "attention", s, "others_mean_ratio") - get(t, "none", s, "others_mean_ratio")
            for s in seeds
        ]
        diffs += d
        entry = {"target": t}
        for m in MASKS:
            vals = [get(t, m, s, "others_mean_ratio") for s in seeds]
            tr = [get(t, m, s, "target_ratio") for s in seeds]
            entry[f"others_{m}"] = round(statistics.fmean(vals), 4)
            entry[f"target_{m}"] = round(statistics.fmean(tr), 3)
            if len(vals) > 1:
                gap = max(vals) - min(vals)
                seed_gaps.append(gap)
                entry[f"seed_spread_{m}"] = round(gap, 4)
        entry["masked_minus_unmasked"] = round(statistics.fmean(d), 4)
        per_target.append(entry)
    overall = {"masked_minus_unmasked_mean": round(statistics.fmean(diffs), 4), "pairs": len(diffs)}
    if len(diffs) > 1:
        overall["masked_minus_unmasked_se"] = round(statistics.stdev(diffs) / len(diffs) ** 0.5, 4)
    if seed_gaps:
        overall["seed_spread_mean"] = round(statistics.fmean(seed_gaps), 4)
        overall["seed_spread_max"] = round(max(seed_gaps), 4)
    # Diagnostics, not the measure: the same paired difference from the per-concept ratios,
    # with each ratio capped at 1 (damage only: a concept drawn better than base counts as
    # kept), and per never-targeted concept (mean ratio over all rows of each arm).
    others = [k for k in rows[0]["ratios"] if k not in targets]
    capped = []
    for t in targets:
        for s in seeds:
            arm = {
                m: next(r for r in rows if (r["target"], r["mask"], r["train_seed"]) == (t, m, s))
                for m in MASKS
            }
            mean = {
                m: statistics.fmean(min(arm[m]["ratios"][o], 1.0) for o in others) for m in MASKS
            }
            capped.append(mean["attention"] - mean["none"])
    diagnostics = {"damage_only_masked_minus_unmasked_mean": round(statistics.fmean(capped), 4)}
    if len(capped) > 1:
        se = statistics.stdev(capped) / len(capped) ** 0.5
        diagnostics["damage_only_masked_minus_unmasked_se"] = round(se, 4)
    per_concept = []
    for o in others:
        mean = {m: statistics.fmean(r["ratios"][o] for r in rows if r["mask"] == m) for m in MASKS}
        per_concept.append(
            {
                "concept": o,
                "ratio_none": round(mean["none"], 3),
                "ratio_attention": round(mean["attention"], 3),
                "masked_minus_unmasked": round(mean["attention"] - mean["none"], 4),
            }
        )
    return {
        "per_target": per_target,
        "overall": overall,
        "diagnostics": diagnostics,
        "per_other_concept": per_concept,
    }


if __name__ == "__main__":
    main()
