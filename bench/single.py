"""Single-concept forgetting on crowd-world: each concept forgotten alone, then scored
against every other concept of the world (the closed-loop re-steering issue's bench).

For each target and method the bench forgets the target from the base model (nothing
preserved, as `fmn forget` does by default), applies the patch, and measures the
world detector's M-Score of every concept of the world on the patched model: 6 templates
x image seeds 1000-1003 = 24 images per concept, 25 DDIM steps. Rows:
{method, concept, type, split, target_ratio, others_mean, worst_other, worst_ratio, steps,
seconds}: ratios are patched / base M-Score; `others_mean` and `worst_*` are over the
other concepts whose base M-Score is at least 0.5. `seconds` is the forgetting alone
(prepare + re-steer), not the scoring; `cpu` names the CPU a row ran on (older rows have none),
since a run that outlasts a session may resume on another machine.

Methods:
- fixed: the type's default rung without the loop (`resteer.loop: false`), mask auto.
- loop: the closed loop (fmn.train.loop: what `fmn forget` and `fmn run` do for concepts
  they re-steer, `erase: resteer`). A concept it fails by name ships nothing: its row is the base
  model (ratios 1), with the loop's reason; `seconds` includes the judging
  (`judge_seconds`).
- gate: the gated text-state eraser (fmn.merge.gates, what `fmn run` and `fmn forget` do
  by default for identities, objects and styles): fitted for the target alone, installed, scored. A
  concept none of whose prompts fires the gate has every text state bit-identical to the
  base model's, so it draws the base model's images exactly: it is not drawn again and its
  ratio is 1 (`redrawn` counts the concepts that were). `seconds` is the fit; the
  vocabulary's states, once per process and type, are in `vocab_seconds`.

Targets (default): every held-out object and style, the first 24 held-out identities,
and beside them every tune object and style and the first 8 tune identities.

Scoring every other concept takes minutes a target (docs/resteer.md), so the bench resumes:
each finished row (and the base M-Scores, first) is appended to
bench/partial/single.jsonl (tracked, so a later session resumes it) with the commit it ran
on; a re-run skips what is there.
Every run ends by writing bench/results/single.json and single.md from the rows in,
naming any still missing; `--report` only does that, computing nothing (a bench that
outlasts a session reports where it stands).

Usage: python bench/single.py [--methods fixed loop gate] [--ids 24] [--tune-ids 8]
       [--targets james circle ...] [--threads 1] [--redo gate] [--quick] [--report]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PARTIALS,
    ROOT,
    append_jsonl,
    crowd_world,
    machine,
    markdown_table,
    read_jsonl,
    touched,
    write_results,
)

SEEDS = (1000, 1001, 1002, 1003)  # the measuring rule: reported numbers at seeds >= 1000
PROMPTS = 6  # 6 templates x 4 seeds = 24 images per concept
SCORED_MIN_BASE = 0.5  # others count in the means only where the base model draws them
PARTIAL = PARTIALS / "single.jsonl"
METHODS = {"fixed": False, "loop": True, "gate": None}  # method -> resteer.loop (gate: none)
OUT = ROOT / "bench" / "results" / "single.json"
COLUMNS = [
    "method",
    "concept",
    "type",
    "split",
    "target_ratio",
    "others_mean",
    "worst_other",
    "worst_ratio",
    "steps",
    "seconds",
    "status",
]


def targets(world, ids: int, tune_ids: int) -> list:
    """Held-out objects, styles and `ids` identities, then tune ones beside them."""
    out = []
    for split, n_ids in (("heldout", ids), ("tune", tune_ids)):
        mine = [c for c in world.concepts() if c.split == split and c.type != "role"]
        out += [c for c in mine if c.type == "id"][:n_ids]
        out += [c for c in mine if c.type in ("object", "style")]
    return out


def score_all(pipe, detector, concepts, *, prompts: int, seeds, steps: int) -> dict[str, float]:
    from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise

    refs = [ConceptRef(c.id, c.type, c.text) for c in concepts]
    rows, _ = score_concepts(
        pipe, refs, detector, prompts_per_concept=prompts, seeds=seeds, steps=steps
    )
    return {cid: s["mscore"] for cid, s in summarise(rows).items()}


def forget(pipe, concept, method: str):
    """The concept's ForgetResult, or None where the loop failed it (nothing shipped), and
    the loop's record (None for the fixed recipe)."""
    from fmn.manifest import ResteerOptions, option_default
    from fmn.train.forget import forget_concept
    from fmn.train.loop import NotForgotten
    from fmn.train.resteer import ResteerConfig

    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}: one of {list(METHODS)}")
    cfg = ResteerConfig.from_options(concept.type, ResteerOptions(loop=METHODS[method]))
    mask = option_default(ResteerOptions, "mask")
    try:
        res = forget_concept(pipe, concept.id, concept.type, concept.text, cfg, mask=mask)
    except NotForgotten as e:
        return None, e.result.loop
    return res, res.loop


def gate_scores(pipe, detector, concept, everyone, base, size) -> tuple[dict, dict]:
    """M-Scores with the concept's gate installed (only the concepts whose prompts it
    changes are drawn again), and what it cost."""
    from fmn.merge.gates import fit, vocabulary_states
    from fmn.model import eraser

    t0 = time.time()
    vocabulary_states(pipe, concept.type)  # once per process and type
    t1 = time.time()
    gates = fit(pipe, [(concept.id, concept.type, [concept.text])])  # as the other methods
    t2 = time.time()
    redraw = touched(pipe, gates, everyone, size["prompts"])
    with eraser.applied(pipe, gates):
        patched = score_all(pipe, detector, redraw, **size) if redraw else {}
    cost = {"fit_seconds": t2 - t1, "vocab_seconds": t1 - t0, "redrawn": len(redraw)}
    return {c.id: patched.get(c.id, base[c.id]) for c in everyone}, cost


def row(method, concept, base, patched, steps, seconds, commit: str, loop=None) -> dict:
    ratio = {c: patched[c] / base[c] for c in base if base[c] > 0}
    others = {c: r for c, r in ratio.items() if c != concept.id and base[c] >= SCORED_MIN_BASE}
    # (none only in --quick, whose 2-step images the detector does not recognise)
    worst = min(others, key=others.get) if others else None
    return {
        "method": method,
        "concept": concept.id,
        "type": concept.type,
        "split": concept.split,
        "target_ratio": ratio[concept.id],
        "others_mean": float(np.mean(list(others.values()))) if others else float("nan"),
        "worst_other": worst,
        "worst_ratio": others[worst] if others else float("nan"),
        "steps": steps,
        "seconds": round(seconds, 2),
        "status": loop["status"] if loop else method,
        "reason": loop["reason"] if loop else "",
        "judge_seconds": loop["judge_seconds"] if loop else 0.0,
        "commit": commit,
    }


def summary(rows: list[dict]) -> list[dict]:
    """Per method and split: the issue's bars (target <= 0.1 of base for >= 90%, worst
    other >= 0.8 in every run, mean of others >= 0.97)."""
    out = []
    for key in dict.fromkeys((r["method"], r["split"]) for r in rows):
        mine = [r for r in rows if (r["method"], r["split"]) == key]
        worst = min(mine, key=lambda r: np.nan_to_num(r["worst_ratio"], nan=np.inf))
        out.append(
            {
                "method": key[0],
                "split": key[1],
                "concepts": len(mine),
                "forgotten_share": float(np.mean([r["target_ratio"] <= 0.1 for r in mine])),
                "target_ratio_mean": float(np.mean([r["target_ratio"] for r in mine])),
                "others_mean_min": float(np.nanmin([r["others_mean"] for r in mine])),
                "worst_ratio": worst["worst_ratio"],
                "worst_run": f"{worst['concept']}: {worst['worst_other']}",
                "failed": sum(r.get("status") == "failed" for r in mine),
                "seconds_mean": float(np.mean([r["seconds"] for r in mine])),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--ids", type=int, default=24, help="held-out identities")
    ap.add_argument("--tune-ids", type=int, default=8)
    ap.add_argument("--targets", nargs="+", help="these concept ids instead")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--redo", nargs="+", default=[], help="run these methods' rows again")
    ap.add_argument("--quick", action="store_true", help="plumbing: 2 targets, 3 others, 2 steps")
    ap.add_argument("--partial", type=Path, default=PARTIAL)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="write the results of the rows in")
    args = ap.parse_args()
    if args.report:
        from fmn.world.concepts import CROWD
    else:
        commit, pipe, detector, CROWD = crowd_world(args.threads)

    everyone = [c for c in CROWD.concepts() if c.type != "role"]
    chosen = (
        [CROWD.get(t) for t in args.targets]
        if args.targets
        else targets(CROWD, args.ids, args.tune_ids)
    )
    size = {"prompts": PROMPTS, "seeds": SEEDS, "steps": 25}
    if args.quick:  # plumbing: its rows stay out of the tracked partial file
        chosen, size = chosen[:2], {"prompts": 1, "seeds": SEEDS[:1], "steps": 2}
        everyone = chosen + [c for c in everyone if c not in chosen][:3]
        args.partial = ROOT / "build" / "bench" / "single.quick.jsonl"
        args.partial.unlink(missing_ok=True)

    args.partial.parent.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(args.partial)
    # a later row of the same (method, concept) replaces an earlier one (--redo)
    latest = {(d["method"], d["concept"]): d for d in done if "method" in d}
    rows = [r for k, r in latest.items() if k[0] not in args.redo]
    if not args.report:
        rows = run_rows(args, commit, pipe, detector, everyone, chosen, size, done, rows)
    report(args, chosen, size, rows)


def run_rows(args, commit, pipe, detector, everyone, chosen, size, done, rows) -> list[dict]:
    """The rows not in yet, each appended to the partial file as it finishes."""
    from fmn.model.patch import apply_patch, revert_patch

    base = next((d["base"] for d in done if "base" in d), None)
    if base is None or set(base) != {c.id for c in everyone}:
        t0 = time.time()
        base = score_all(pipe, detector, everyone, **size)
        append_jsonl(args.partial, {"base": base, "commit": commit})
        print(f"base M-Scores of {len(base)} concepts: {time.time() - t0:.0f} s", flush=True)
    have = {(r["method"], r["concept"]) for r in rows}
    cpu = machine(args.threads)["cpu"]  # per row: a bench that outlasts a session may move
    for method in args.methods:
        for c in chosen:
            if (method, c.id) in have:
                continue
            t0 = time.time()
            if method == "gate":
                patched, cost = gate_scores(pipe, detector, c, everyone, base, size)
                r = row(method, c, base, patched, 0, cost["fit_seconds"], commit) | cost
                r["cpu"] = cpu
                append_jsonl(args.partial, r)
                rows.append(r)
                print(json.dumps(r), flush=True)
                continue
            result, loop = forget(pipe, c, method)
            seconds = time.time() - t0
            if result is None:  # the loop failed it by name: nothing shipped, the base stays
                patched, steps = base, loop["steps"]
            else:
                apply_patch(pipe, result.patch)
                try:
                    patched = score_all(pipe, detector, everyone, **size)
                finally:
                    revert_patch(pipe, result.patch)
                steps = loop["steps"] if loop else len(result.resteer.losses)
            r = row(method, c, base, patched, steps, seconds, commit, loop) | {"cpu": cpu}
            append_jsonl(args.partial, r)
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def report(args, chosen, size, rows: list[dict]) -> None:
    """bench/results/single.json and .md from the rows of the methods and targets asked
    for, naming those still missing."""
    want = [(m, c.id) for m in args.methods for c in chosen]
    rows = [r for r in rows if (r["method"], r["concept"]) in set(want)]
    have = {(r["method"], r["concept"]) for r in rows}
    missing = [f"{m}: {c}" for m, c in want if (m, c) not in have]
    commits = sorted({r.pop("commit") for r in rows})
    result = {
        "commit": commits[0] if len(commits) == 1 else commits,
        "machine": machine(args.threads),
        "images_per_concept": size["prompts"] * len(size["seeds"]),
        "seeds": list(size["seeds"]),
        "quick": args.quick,
        "missing": missing,
        "summary": summary(rows),
        "rows": rows,
    }
    table = markdown_table(result["summary"]) + "\n" + markdown_table(rows, COLUMNS)
    if missing:  # a bench still running: say so above the tables
        table = f"**{len(rows)} of {len(want)} rows in; missing:** {', '.join(missing)}\n\n" + table
    write_results(args.out, result, table, "Single-concept forgetting on crowd-world")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
