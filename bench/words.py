"""Removing a concept reached by several words (the NSFW-extension issue's bench): crowd-world's
many-word concepts, trained on the phrasings a manifest lists, measured on the ones it
does not.

For each many-word concept of crowd-world (night and heart, both held out) and each method
the bench forgets it from the base model alone and scores, on the patched model:
- the concept under each of its phrasings, listed and unlisted (the world's classifier
  reading the concept's id; 6 templates x image seeds 1000-1003 = 24 images each);
- every other concept of the world (6 templates x seeds 1000-1001 = 12 images each;
  `--other-seeds 4`: seeds 1000-1003, 24 images, the single bench's count).

Methods:
- gate: what `fmn run` and `fmn forget` do by default (`erase: auto`): the concept's gate
  (fmn.merge.gates) on its listed phrasings, widened by the vocabulary words the base
  model itself draws like it (fmn.merge.similar); `loop` is empty. Other concepts whose
  prompts it does not change draw the base model's images bit for bit and are not drawn
  again; `taken` lists the words the base model drew like it;
- gate-listed: the same gate on the listed phrasings alone (not widened);
- words: re-steered on the world's listed phrasings (`words: [night, midnight]`);
- text: re-steered on the concept's text alone (`night`), the way before `words:`.
The re-steered ones with the closed loop (`erase: resteer`'s default; a concept it fails
by name ships nothing, so its row is the base model) and with the fixed recipe
(`resteer.loop: false`), which shows what the edit itself does. A gate's `seconds`
include the vocabulary's states and, for `gate`, the base model's judging.

Rows {method, loop, concept, split, listed_ratio, unlisted_ratio, unlisted_worst,
phrasings, others_mean, worst_other, worst_ratio, status, reason, seconds}: ratios are
patched / base M-Score; `listed_ratio` the mean over listed phrasings, `unlisted_ratio` the
highest over unlisted ones (the phrasing that brings the concept back most), the others'
over concepts whose base M-Score is at least 0.5. The run resumes from
bench/partial/words.jsonl (tracked); when every row is in it writes bench/results/words.json/.md.

Usage: python bench/words.py [--threads 1] [--quick] [--methods ...] [--other-seeds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

TARGET_SEEDS = (1000, 1001, 1002, 1003)  # the measuring rule: seeds >= 1000
OTHER_SEEDS = (1000, 1001)
PROMPTS = 6
SCORED_MIN_BASE = 0.5
PARTIAL = common.PARTIALS / "words.jsonl"
OUT = common.ROOT / "bench" / "results" / "words.json"
METHODS = ("words", "text")  # re-steered, each with and without the loop
GATES = ("gate-listed", "gate")
COLUMNS = [
    "method",
    "loop",
    "concept",
    "split",
    "listed_ratio",
    "unlisted_ratio",
    "unlisted_worst",
    "others_mean",
    "worst_other",
    "worst_ratio",
    "status",
    "seconds",
    "taken",
]


def score(pipe, detector, refs, *, prompts: int, seeds, steps: int) -> dict[str, float]:
    """M-Score of each ConceptRef, by id (refs of distinct ids share one generation pass)."""
    from fmn.eval.mscore.score import score_concepts, summarise

    rows, _ = score_concepts(
        pipe, refs, detector, prompts_per_concept=prompts, seeds=seeds, steps=steps
    )
    return {cid: s["mscore"] for cid, s in summarise(rows).items()}


def measure(pipe, detector, world, target, others, size) -> dict[str, float]:
    """The target under each phrasing ("<id>:<words>") and every other concept (by id)."""
    from fmn.eval.mscore.score import ConceptRef

    size = dict(size)
    other_seeds = size.pop("other_seeds")
    got = {}
    for w, _ in world.words[target.id]:
        ref = ConceptRef(target.id, target.type, w)
        got[f"{target.id}:{w}"] = score(pipe, detector, [ref], seeds=TARGET_SEEDS, **size)[
            target.id
        ]
    rest = [ConceptRef(c.id, c.type, c.text) for c in others]
    return got | (score(pipe, detector, rest, seeds=other_seeds, **size) if rest else {})


def forget(pipe, world, concept, method: str, loop: bool | None):
    """(a re-steering result, or an eraser for a gate; None if the loop failed it by name,
    the loop's record or None)."""
    from fmn.manifest import ResteerOptions, option_default
    from fmn.train.forget import forget_concept
    from fmn.train.loop import NotForgotten
    from fmn.train.resteer import ResteerConfig

    listed = [w for w, shown in world.words[concept.id] if shown]
    if method in GATES:
        from fmn.merge.gates import fit

        one = [(concept.id, concept.type, listed)]
        return fit(pipe, one, widen=[concept.id] if method == "gate" else []), None
    words = listed if method == "words" else None
    cfg = ResteerConfig.from_options(concept.type, ResteerOptions(loop=loop))
    mask = option_default(ResteerOptions, "mask")
    try:
        res = forget_concept(
            pipe, concept.id, concept.type, concept.text, cfg, mask=mask, words=words
        )
    except NotForgotten as e:
        return None, e.result.loop
    return res, res.loop


def row(method, loop, concept, world, base, patched, seconds, commit, record) -> dict:
    ratio = {k: patched[k] / base[k] for k in base if base[k] > 0}
    listed = [w for w, shown in world.words[concept.id] if shown]
    unlisted = [w for w, shown in world.words[concept.id] if not shown]
    un = {w: ratio.get(f"{concept.id}:{w}", float("nan")) for w in unlisted}
    others = {
        k: r
        for k, r in ratio.items()
        if ":" not in k and k != concept.id and base[k] >= SCORED_MIN_BASE
    }
    worst = min(others, key=others.get) if others else None
    return {
        "method": method,
        "loop": loop,
        "concept": concept.id,
        "split": concept.split,
        "listed_ratio": float(np.mean([ratio[f"{concept.id}:{w}"] for w in listed])),
        "unlisted_ratio": max(un.values()),
        "unlisted_worst": max(un, key=un.get),
        "phrasings": {
            w: round(ratio.get(f"{concept.id}:{w}", float("nan")), 4)
            for w, _ in world.words[concept.id]
        },
        "others_mean": float(np.mean(list(others.values()))) if others else float("nan"),
        "worst_other": worst,
        "worst_ratio": others[worst] if others else float("nan"),
        "status": record["status"] if record else ("gate" if loop is None else "fixed"),
        "reason": record["reason"] if record else "",
        "seconds": round(seconds, 2),
        "commit": commit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="plumbing: 1 concept, 2 others, 2 steps")
    ap.add_argument("--partial", type=Path, default=PARTIAL)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--methods", nargs="+", default=[*GATES, *METHODS], choices=[*GATES, *METHODS])
    ap.add_argument("--other-seeds", type=int, default=len(OTHER_SEEDS),
                    help="image seeds (from 1000) per other concept, 6 images each")  # fmt: skip
    args = ap.parse_args()
    commit, pipe, detector, CROWD = common.crowd_world(args.threads)
    from fmn.model import eraser
    from fmn.model.patch import apply_patch, revert_patch

    targets = [CROWD.get(cid) for cid in CROWD.words]
    everyone = [c for c in CROWD.concepts() if c.type != "role"]
    size = {
        "prompts": PROMPTS,
        "steps": 25,
        "other_seeds": tuple(range(1000, 1000 + args.other_seeds)),
    }
    if args.quick:
        targets = targets[:1]
        everyone = targets + [c for c in everyone if c not in targets][:2]
        size = {"prompts": 1, "steps": 2, "other_seeds": OTHER_SEEDS[:1]}
        args.partial = common.ROOT / "build" / "bench" / "words.quick.jsonl"  # untracked
        args.out = common.ROOT / "build" / "bench" / "words.json"
        args.partial.unlink(missing_ok=True)
    args.partial.parent.mkdir(parents=True, exist_ok=True)
    done = common.read_jsonl(args.partial)
    base = {}
    for t in targets:
        others = [c for c in everyone if c.id != t.id]
        have = next((d["base"] for d in done if d.get("base_for") == t.id), None)
        if have is None:
            t0 = time.time()
            have = measure(pipe, detector, CROWD, t, others, size)
            common.append_jsonl(args.partial, {"base_for": t.id, "base": have, "commit": commit})
            print(f"base for {t.id}: {time.time() - t0:.0f} s", flush=True)
        base[t.id] = have
    rows = [d for d in done if "method" in d]
    have_rows = {(r["method"], r["loop"], r["concept"]) for r in rows}
    runs = [(m, None) for m in GATES] + [(m, loop) for loop in (True, False) for m in METHODS]
    runs = [(m, loop) for m, loop in runs if m in args.methods]
    for t in targets:
        others = [c for c in everyone if c.id != t.id]
        for method, loop in runs:
            if (method, loop, t.id) in have_rows:
                continue
            t0 = time.time()
            res, record = forget(pipe, CROWD, t, method, loop)
            seconds = time.time() - t0
            if res is None:  # failed by name: nothing shipped, the base stays
                patched = base[t.id]
            elif loop is None:  # a gate: the concepts it leaves bit-exact keep base scores
                redraw = common.touched(pipe, res, others, size["prompts"])
                with eraser.applied(pipe, res):
                    patched = base[t.id] | measure(pipe, detector, CROWD, t, redraw, size)
            else:
                apply_patch(pipe, res.patch)
                try:
                    patched = measure(pipe, detector, CROWD, t, others, size)
                finally:
                    revert_patch(pipe, res.patch)
            r = row(method, loop, t, CROWD, base[t.id], patched, seconds, commit, record)
            if loop is None:  # the words the base model drew like the concept, if widened
                r["taken"] = ", ".join(w for w, _ in res.gates[0].similar)
            common.append_jsonl(args.partial, r)
            rows.append(r)
            print(json.dumps(r), flush=True)
    commits = sorted({r.pop("commit") for r in rows})
    result = {
        "commit": commits[0] if len(commits) == 1 else commits,
        "machine": common.machine(args.threads),
        "target_images_per_phrasing": size["prompts"] * len(TARGET_SEEDS),
        "other_images_per_concept": size["prompts"] * len(size["other_seeds"]),
        "quick": args.quick,
        "rows": rows,
    }
    common.write_results(
        args.out, result, common.markdown_table(rows, COLUMNS), "Many-word removal on crowd-world"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
