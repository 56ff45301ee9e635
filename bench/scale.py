"""Scaling of the whole per-concept path on the embedded world: prepare + re-steer + merge.

For N = 1, 4, 16, 64 concepts (the world's concepts cycled, each cycle with another seed,
so every concept gets other generated images and other training noise; ids get the cycle
as suffix), in a fresh subprocess per N: total wall time of generate/prepare (16 images),
re-steer (per-type defaults) and save each patch, then a closed-form merge of all N with a
preserve list; peak RSS above the process's RSS after loading the model. Prints a
least-squares fit seconds = a + b*N with R^2. Also the merge alone of the 64 patches.

The number of re-steering steps per concept is an option (default 35); this measures
scaling, not efficacy, so a shorter run (--steps 10) is fine and recorded in the results.
`--together K` re-steers K concepts per shared UNet pass (`defaults.train_together`, the
nightly manifest's 8); seconds per concept are then each group's time / its size.
Usage: python bench/scale.py [--n 1 4 16 64] [--steps 10] [--together 8]
Writes bench/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    write_results,
)

PRESERVED = ["alice", "star", "dots"]  # never targeted; they anchor the closed-form merge


def targets(n: int) -> list[tuple[str, str, str, int]]:
    """(id, type, text, seed) of the first n targets: the world's concepts minus the
    preserved ones, cycled, the cycle number as seed and id suffix."""
    from fmn.world.concepts import world_concepts

    pool = [c for c in world_concepts() if c.id not in PRESERVED]
    return [
        (f"{c.id}-{k // len(pool)}", c.type, c.text, k // len(pool))
        for k, c in ((k, pool[k % len(pool)]) for k in range(n))
    ]


def worker(args) -> None:
    from fmn.data.prepare import prepare_concept
    from fmn.merge.fuse import MergeConfig, merge_patches
    from fmn.model.load import load_pipeline
    from fmn.model.patch import save_patch
    from fmn.train.forget import forget_concept, resteer_prepared_batch
    from fmn.train.resteer import resteer_config_for
    from fmn.world import EMBEDDED_NAME
    from fmn.world.concepts import get_concept

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(EMBEDDED_NAME)
    preserve = [(get_concept(c).text, get_concept(c).type) for c in PRESERVED]
    folder = Path(args.patches)
    paths, per_concept = [], []
    todo, k = targets(args.n[0]), args.together
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for i in range(0, len(todo), k):
            chunk, t = todo[i : i + k], time.perf_counter()
            cfgs = [resteer_config_for(kind, steps=args.steps, seed=s) for _, kind, _, s in chunk]
            if k == 1:
                (cid, kind, text, _), cfg = chunk[0], cfgs[0]
                res = [
                    forget_concept(
                        pipe, cid, kind, text, cfg, generate=16, preserve=preserve, mask="none"
                    )
                ]
            else:  # defaults.train_together: k concepts share every UNet pass
                datas = [
                    prepare_concept(pipe, cid, kind, text, generate=16, seed=s)
                    for cid, kind, text, s in chunk
                ]
                res = resteer_prepared_batch(pipe, datas, cfgs, preserve=preserve)
            paths += [save_patch(r.patch, folder / c[0]) for r, c in zip(res, chunk, strict=True)]
            del res
            per_concept += [(time.perf_counter() - t) / len(chunk)] * len(chunk)
        t = time.perf_counter()
        merged = merge_patches(pipe, paths, MergeConfig(method="closed-form"), preserve=preserve)
        merge_seconds = time.perf_counter() - t
        seconds = time.perf_counter() - t0
    out = {
        "n_concepts": args.n[0],
        "seconds": seconds,
        "peak_mb": mem.mb,
        "rss_start_mb": mem.start,
        "maxrss_mb": maxrss_mb(),
        "merge_seconds": merge_seconds,
        "merge_deltas": len(merged.patch.deltas),
        "seconds_per_concept_mean": float(np.mean(per_concept)),
    }
    Path(args.result).write_text(json.dumps(out))
    print(json.dumps(out), flush=True)


def merge_only(args) -> None:
    """Merge alone: the patches already on disk, closed-form with the preserve list."""
    from fmn.merge.fuse import MergeConfig, merge_patches
    from fmn.model.load import load_pipeline
    from fmn.world import EMBEDDED_NAME
    from fmn.world.concepts import get_concept

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(EMBEDDED_NAME)
    preserve = [(get_concept(c).text, get_concept(c).type) for c in PRESERVED]
    paths = [Path(args.patches) / cid for cid, *_ in targets(args.n[0])]
    times = []
    with PeakRSS() as mem:
        for _ in range(args.repeats):
            t = time.perf_counter()
            merge_patches(pipe, paths, MergeConfig(method="closed-form"), preserve=preserve)
            times.append(time.perf_counter() - t)
    out = {"n": len(paths), "seconds": times, "peak_mb": mem.mb}
    Path(args.result).write_text(json.dumps(out))
    print(json.dumps(out), flush=True)


def fit(ns: list[int], secs: list[float]) -> dict:
    x, y = np.asarray(ns, float), np.asarray(secs, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    return {
        "a_seconds": round(float(a), 3),
        "b_seconds_per_concept": round(float(b), 3),
        "r2": round(float(r2), 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--together", type=int, default=1, help="concepts per shared re-steering pass")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the merge-only timing")
    ap.add_argument("--out", default="bench/results/scale.json")
    ap.add_argument("--worker", choices=["run", "merge"], help=argparse.SUPPRESS)
    ap.add_argument("--patches", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "run":
        return worker(args)
    if args.worker == "merge":
        return merge_only(args)

    t_start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="fmn-bench-scale-"))
    common = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads)]
    common += ["--together", str(args.together)]
    rows = []
    try:
        for n in args.n:
            folder = tmp / f"patches-{n}"
            res = tmp / f"run-{n}.json"
            cmd = [
                *common,
                "--worker",
                "run",
                "--n",
                str(n),
                "--patches",
                str(folder),
                "--result",
                str(res),
            ]
            print(f"N = {n}", flush=True)
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            rows.append(json.loads(res.read_text()))
        big = max(args.n)
        res = tmp / "merge.json"
        cmd = [
            *common,
            "--worker",
            "merge",
            "--n",
            str(big),
            "--repeats",
            str(args.repeats),
            "--patches",
            str(tmp / f"patches-{big}"),
            "--result",
            str(res),
        ]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        merge = json.loads(res.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in rows:
        for k in ("seconds", "peak_mb", "merge_seconds", "seconds_per_concept_mean", "maxrss_mb"):
            r[k] = round(r[k], 3 if "seconds" in k else 1)
    result = {
        "rows": rows,
        "fit": fit([r["n_concepts"] for r in rows], [r["seconds"] for r in rows]),
        f"merge{big}_seconds": round(float(np.median(merge["seconds"])), 3),
        "merge_only": merge,
        "preserve": PRESERVED,
        "settings": {
            "steps_per_concept": args.steps,
            "together": args.together,
            "images_per_concept": 16,
            "merge": "closed-form",
        },
        "machine": machine(args.threads),
        "threads": args.threads,
        "commit": git_commit(),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    f = result["fit"]
    table = markdown_table(
        rows,
        [
            "n_concepts",
            "seconds",
            "peak_mb",
            "merge_seconds",
            "seconds_per_concept_mean",
            "maxrss_mb",
        ],
    )
    table += (
        f"\nFit: seconds = {f['a_seconds']} + {f['b_seconds_per_concept']} * N, "
        f"R^2 = {f['r2']}. Merge alone of {big} patches (closed-form, median of "
        f"{args.repeats}): {result[f'merge{big}_seconds']} s. Steps per concept: {args.steps}; "
        f"concepts per re-steering pass: {args.together}.\n"
    )
    write_results(Path(args.out), result, table, "Scaling: prepare + re-steer + merge")
    print(table)


if __name__ == "__main__":
    main()
