"""Per-concept re-steering cost on the embedded world: ours vs the original loop.

OURS: `fmn.train.forget.forget_concept` (prepare: VAE latents and text states computed once;
re-steer: only attn2 to_k/to_v require grad, SDPA self-attention, capture on attn2 only,
per-type defaults; builds the patch), one concept at a time.
OURS-BATCH: the same for every concept at once (`fmn.train.forget.resteer_prepared_batch`, what
`defaults.train_together` makes a run do): separate patches, shared UNet passes; seconds
per concept = the whole wall time / the number of concepts.
ORIGINAL: a faithful re-implementation of Forget-Me-Not's `attn_steer` loop (Zhang et al.,
github.com/SHI-Labs/Forget-Me-Not): every step VAE-encodes the images (a fresh latent
sample) and runs the text encoder; the whole UNet is trainable in fp32 (AdamW over every
parameter, no gradient clipping, as in its whole-UNet mode); every attention module gets
the classic explicit-probabilities processor and every attn2 call's full probabilities
are kept; the loss is the norm of the attention on the concept's tokens plus every
end-of-text position (`use_pooler: true`) over all pixels.

Both get the same 16 images (generated once by the base model, not timed), the same batch
(4), the same number of steps (35), in the same run, interleaved per repeat, each repeat
in a fresh subprocess so that peak memory is per implementation. The world classifier
measures afterwards (it feeds no loss) (target M-Score ratio to base, and a few other concepts).

Usage: python bench/resteer.py [--concepts carol eve triangle circle outline dots] [--repeats 3]
Writes bench/results/resteer.json and resteer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ROOT,
    PeakRSS,
    git_commit,
    machine,
    markdown_table,
    maxrss_mb,
    rss_mb,
    write_results,
)
from bench.forget_sweep import applied  # the deltas added to the UNet for a block

ORIGINAL_LR = 2e-6  # the original configs' learning rate
STEPS, BATCH, N_IMAGES = 35, 4, 16
OTHERS = ["alice", "bob", "square", "star", "flat", "checker"]  # measured, never targeted


# ---------------------------------------------------------------------------------------
# The original loop


class _Controller:
    """The original's attention controller: keeps the probabilities at the marked
    positions of every cross-attention call; loss = their norm."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # [B, T] bool
        self.probs: list[torch.Tensor] = []

    def __call__(self, probs: torch.Tensor) -> None:
        b = self.positions.shape[0]
        heads = probs.shape[0] // b
        pos = self.positions.repeat_interleave(heads, 0)[:, None, :].expand_as(probs)
        self.probs.append(probs.masked_select(pos))

    def loss(self) -> torch.Tensor:
        return torch.cat(self.probs).norm()


class _OriginalProcessor:
    """diffusers' classic AttnProcessor on every attention module (as the original code
    installs it); cross-attention probabilities go to the controller."""

    def __init__(self, controller: _Controller) -> None:
        self.controller = controller

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        is_cross = encoder_hidden_states is not None
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states if is_cross else hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, None)
        if is_cross:
            self.controller(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def original_forget(pipe, concept, images: np.ndarray, *, steps: int, lr: float, seed: int = 0):
    """The original re-steering loop; returns the whole-UNet deltas."""
    from diffusers import DDPMScheduler

    from fmn.model.attention import token_weights
    from fmn.model.conditioning import concept_prompts, concept_token_ids, token_ids

    unet, vae, text_encoder, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = concept_prompts(concept.text, concept.type)
    ids = token_ids(tok, prompts)
    positions = token_weights(
        ids, concept_token_ids(tok, concept.text), "all_eot", eos_id=tok.eos_token_id
    ).bool()
    pixels = torch.tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    controller = _Controller()
    originals = dict(unet.attn_processors)
    unet.set_attn_processor(_OriginalProcessor(controller))
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(pixels), (BATCH,), generator=gen)
            which = torch.randint(0, len(prompts), (BATCH,), generator=gen)
            dist = vae.encode(pixels[idx]).latent_dist
            latents = dist.sample(generator=gen) * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (BATCH,), generator=gen)
            noisy = sched.add_noise(latents, noise, t)
            states = text_encoder(ids[which])[0]
            controller.probs, controller.positions = [], positions[which]
            unet(noisy, t, encoder_hidden_states=states)
            loss = controller.loss()
            loss.backward()
            opt.step()
            opt.zero_grad()
        deltas = {n: (p.detach() - base[n]).clone() for n, p in unet.named_parameters()}
    finally:
        with torch.no_grad():
            for n, p in unet.named_parameters():
                p.copy_(base[n])
        unet.requires_grad_(False)
        unet.eval()
        unet.set_attn_processor(dict(originals))
    return {n: d for n, d in deltas.items() if d.abs().max() > 0}


# ---------------------------------------------------------------------------------------
# Worker: one implementation, every concept, one repeat, in its own process


def score(pipe, detector, ids: list[str], prompts: int, seeds: int) -> dict[str, float]:
    from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
    from fmn.world.concepts import get_concept

    refs = [ConceptRef(c.id, c.type, c.text) for c in map(get_concept, ids)]
    rows, _ = score_concepts(
        pipe, refs, detector, prompts_per_concept=prompts, seeds=tuple(range(seeds))
    )
    return {k: v["mscore"] for k, v in summarise(rows).items()}


def ours_batch(pipe, args, images) -> dict[str, tuple[dict, dict]]:
    """OURS-BATCH: every concept prepared, then re-steered together in shared UNet passes
    (fmn.train.resteer_batch; each still gets its own patch). Seconds per concept: the whole
    wall time (prepare included) divided by the number of concepts."""
    from fmn.data.prepare import prepare_concept
    from fmn.train.forget import resteer_prepared_batch
    from fmn.train.resteer import resteer_config_for
    from fmn.world.concepts import get_concept

    cs = [get_concept(cid) for cid in args.concepts]
    cfgs = [resteer_config_for(c.type, steps=args.steps) for c in cs]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        datas = [
            prepare_concept(pipe, c.id, c.type, c.text, images=images[c.id], seed=cfg.seed)
            for c, cfg in zip(cs, cfgs, strict=True)
        ]
        results = resteer_prepared_batch(pipe, datas, cfgs)
        seconds = (time.perf_counter() - t0) / len(cs)
    return {
        c.id: (
            r.patch.deltas,
            {"concept": c.id, "seconds": seconds, "peak_mb": mem.mb, "rss_start_mb": mem.start},
        )
        for c, r in zip(cs, results, strict=True)
    }


def worker(args) -> None:
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.model.load import load_pipeline
    from fmn.train.forget import forget_concept
    from fmn.train.resteer import resteer_config_for
    from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
    from fmn.world.concepts import get_concept

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(EMBEDDED_NAME)
    images = np.load(args.images)
    out = {"impl": args.impl, "repeat": args.repeat, "runs": []}
    impl, _, lr = args.impl.partition("@")
    trained = ours_batch(pipe, args, images) if impl == "ours-batch" else {}
    for cid in args.concepts:
        c = get_concept(cid)
        if cid in trained:
            deltas, run = trained[cid]
        else:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if impl == "ours":
                    cfg = resteer_config_for(c.type, steps=args.steps)
                    deltas = forget_concept(
                        pipe, c.id, c.type, c.text, cfg, images=images[cid], mask="none"
                    ).patch.deltas
                else:
                    deltas = original_forget(
                        pipe, c, images[cid], steps=args.steps, lr=float(lr or ORIGINAL_LR)
                    )
                seconds = time.perf_counter() - t0
            run = {"concept": cid, "seconds": seconds, "peak_mb": mem.mb, "rss_start_mb": mem.start}
        if args.score:
            detector = WorldDetector(EMBEDDED_DIR / "classifier")
            with applied(pipe.unet, deltas):
                run["mscore"] = score(pipe, detector, [cid, *OTHERS], args.prompts, args.seeds)
        out["runs"].append(run)
        print(json.dumps(run), flush=True)
    out["maxrss_mb"] = maxrss_mb()
    out["rss_end_mb"] = rss_mb()
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--concepts", nargs="+", default=["carol", "eve", "triangle", "circle", "outline", "dots"]
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        default=["ours", "ours-batch", "original", "original@1e-4"],
        help="ours | ours-batch | original[@lr] (default lr: the original's 2e-6)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="bench/results/resteer.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from fmn.data.prepare import generate_concept_images
    from fmn.eval.mscore.detectors import WorldDetector
    from fmn.model.load import load_pipeline
    from fmn.world import EMBEDDED_DIR, EMBEDDED_NAME
    from fmn.world.concepts import get_concept

    torch.set_num_threads(args.threads)
    t_start = time.time()
    pipe = load_pipeline(EMBEDDED_NAME)
    tmp = Path(tempfile.mkdtemp(prefix="fmn-bench-resteer-"))
    images = {
        cid: generate_concept_images(pipe, get_concept(cid).text, get_concept(cid).type, N_IMAGES)
        for cid in args.concepts
    }
    np.savez(tmp / "images.npz", **images)
    detector = WorldDetector(EMBEDDED_DIR / "classifier")
    base = score(pipe, detector, [*args.concepts, *OTHERS], args.prompts, args.seeds)
    del pipe
    print("base", json.dumps(base), flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    results = []
    for r in range(args.repeats):
        for impl in args.impls:  # interleaved: contention hits every implementation alike
            res = tmp / f"{impl}-{r}.json"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--impl",
                impl,
                "--repeat",
                str(r),
                "--images",
                str(tmp / "images.npz"),
                "--result",
                str(res),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--prompts",
                str(args.prompts),
                "--seeds",
                str(args.seeds),
                "--concepts",
                *args.concepts,
            ]
            if r == 0:
                cmd.append("--score")
            print(f"repeat {r}: {impl}", flush=True)
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            results.append(json.loads(res.read_text()))

    rows, per_concept = [], []
    for impl in args.impls:
        mine = [x for x in results if x["impl"] == impl]
        secs = [run["seconds"] for x in mine for run in x["runs"]]
        scored = next(x for x in mine if x["repeat"] == 0)["runs"]
        ratios = {
            run["concept"]: run["mscore"][run["concept"]] / max(base[run["concept"]], 1e-6)
            for run in scored
        }
        others = [run["mscore"][o] / max(base[o], 1e-6) for run in scored for o in OTHERS]
        rows.append(
            {
                "impl": impl,
                "steps": args.steps,
                "seconds_per_concept": round(float(np.mean(secs)), 3),
                "seconds_min": round(float(np.min(secs)), 3),
                "seconds_max": round(float(np.max(secs)), 3),
                "peak_mb": round(max(run["peak_mb"] for x in mine for run in x["runs"]), 1),
                "process_maxrss_mb": round(max(x["maxrss_mb"] for x in mine), 1),
                "target_mscore_ratio": round(float(np.mean(list(ratios.values()))), 3),
                "others_mscore_ratio": round(float(np.mean(others)), 3),
            }
        )
        for cid in args.concepts:
            cs = [run["seconds"] for x in mine for run in x["runs"] if run["concept"] == cid]
            per_concept.append(
                {
                    "impl": impl,
                    "concept": cid,
                    "seconds": [round(s, 3) for s in cs],
                    "target_mscore_ratio": round(ratios[cid], 3),
                }
            )
    # how many times faster than the original loop at its own lr (same run, same steps)
    orig = next((r for r in rows if r["impl"] == "original"), None)
    for r in rows:
        if orig is not None:
            r["speedup_vs_original"] = round(
                orig["seconds_per_concept"] / r["seconds_per_concept"], 2
            )
    result = {
        "rows": rows,
        "per_concept": per_concept,
        "base_mscore": base,
        "concepts": args.concepts,
        "others": OTHERS,
        "settings": {
            "steps": args.steps,
            "batch": BATCH,
            "images": N_IMAGES,
            "score_prompts": args.prompts,
            "score_seeds": args.seeds,
            "repeats": args.repeats,
            "original_default_lr": ORIGINAL_LR,
        },
        "raw": results,
        "machine": machine(args.threads),
        "threads": args.threads,
        "commit": git_commit(),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    cols = [
        "impl",
        "steps",
        "seconds_per_concept",
        "seconds_min",
        "seconds_max",
        "peak_mb",
        "process_maxrss_mb",
        "target_mscore_ratio",
        "others_mscore_ratio",
        "speedup_vs_original",
    ]
    table = markdown_table(rows, cols)
    table += "\n" + markdown_table(per_concept)
    write_results(Path(args.out), result, table, "Re-steering per concept: ours vs the original")
    print(table)


if __name__ == "__main__":
    main()
