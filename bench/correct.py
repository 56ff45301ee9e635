"""Concept correction on crowd-world (the NSFW-and-correction issue's bench): a biased role
word corrected towards a guide set, and a style the model draws wrong corrected towards
images of it.

Cases (each corrected alone from the base model, `fmn forget --correct-to`'s path), each
by every method that takes its guide: "route" (the default for guide prompts: a gate that
replaces the word by each guide's words in turn, fmn.model.eraser), "resteer" (the
keys and values trained towards the guide's images, fmn.train.correct) and "resteer-kept"
(the same training with every other concept of the world listed as preserved, as a
manifest's `preserve:` or `fmn forget --preserve` lists them: the preservation term then
holds their prompts' keys and values too; words only, no detector):
- doctor (held out; "a doctor" draws john in about nine images of ten): guide prompts
  "a photo of <name>" for the five people the role's training captions show (john, ruth,
  lisa, donna, eugene). Measured: the share of "a doctor"'s images drawn as each of the
  five (the audit's guide shares, 4 world templates x seeds 1000-1015 = 64 images),
  before and after.
- michael (tune; the tune stand-in for the diversity task, on which the method was
  chosen): "a photo of michael" towards five tune people (robert, chris, donald, steven,
  josh), measured as doctor is.
- checker (a tune concept; the model draws some of its images as another style): guide
  images rendered by the world's procedural generator (16 checker images of random shapes
  and colours: data a user would supply as a folder, no detector involved). Measured: its
  top-1 accuracy (share of images the world's classifier reads as checker), 64 images.
- drop (held out; of the held-out objects and styles the one the base model draws least
  reliably, by the base M-Scores of the run at 0211caa): the same, with 16 rendered drop
  images in random styles; the accuracy fix on a concept no setting was chosen on.
  Sixteen seeds, not four: a seed's noise is shared by every prompt drawn with it, and
  so a seed's images are not independent draws (docs/correct.md).
All: every other concept of the world, base and corrected (6 templates x seeds
1000-1001 = 12 images each), ratios over concepts whose base M-Score is at least 0.5. The
base model's are drawn once for every case; a route leaves every prompt it does not change
bit-exact, so only the concepts whose prompts it changes are drawn again (`others_drawn`).

Rows {method, concept, split, guide, measure, before, after, dominant, dominant_over_fair,
guides_drawn, others_mean, worst_other, worst_ratio, others_drawn, seconds}. Resumes from
bench/partial/correct-64.jsonl (tracked; named by the word's image count); writes
bench/results/correct.json/.md.

Then a second look at the accuracy cases (checker, drop), whose trained patches move
neighbouring styles and objects: each trained method's patch is trained again (same
seed; once for both looks) and every other style and object of the world is drawn on 48
images (6 templates x seeds 1000-1007), base and corrected: 12 images of a concept read
a few hundredths apart from one seed pair to the next. Rows {method, concept, images,
others_mean, worst_other, worst_ratio, ratios} in bench/partial/correct-confirm.jsonl
and under "confirm" in the results. And the word itself on 64 more images (image seeds
1016-1031), base and by each trained method, to see whether other seeds agree: rows
{method, concept, seeds, before, after} in bench/partial/correct-again.jsonl, under
"again".

Usage: python bench/correct.py [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

SEEDS = tuple(range(1000, 1016))  # the measuring rule: seeds >= 1000
OTHER_SEEDS = (1000, 1001)
PROMPTS, OTHER_PROMPTS = 4, 6
SCORED_MIN_BASE = 0.5
PARTIAL = common.PARTIALS / f"correct-{PROMPTS * len(SEEDS)}.jsonl"
CONFIRM_SEEDS = tuple(range(1000, 1008))  # the accuracy cases' neighbours, on 48 images
CONFIRM = common.PARTIALS / "correct-confirm.jsonl"
AGAIN_SEEDS = tuple(range(1016, 1032))  # the accuracy cases' word, at 16 other seeds
AGAIN = common.PARTIALS / "correct-again.jsonl"
OUT = common.ROOT / "bench" / "results" / "correct.json"
COLUMNS = [
    "method",
    "concept",
    "split",
    "measure",
    "before",
    "after",
    "dominant",
    "dominant_over_fair",
    "guides_drawn",
    "others_mean",
    "worst_other",
    "worst_ratio",
    "others_drawn",
    "seconds",
]
CONFIRM_COLUMNS = ["method", "concept", "images", "others_mean", "worst_other", "worst_ratio"]


def render_guide(world, concept: str, folder: Path, n: int = 16, seed: int = 0) -> Path:
    """n images of a style or object from the world's procedural renderer (the other of the
    two random), as a user's guide folder."""
    from PIL import Image

    from fmn.world.concepts import COLOURS
    from fmn.world.render import render_object

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if concept in world.shapes:
            shape, style = concept, str(rng.choice(world.styles))
        else:  # (a style's guide: the draws of the first runs, image for image)
            shape, style = str(rng.choice(world.shapes)), concept
        image, _ = render_object(shape, style, str(rng.choice(list(COLOURS))), 32, rng)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


TUNE_CAST = ["robert", "chris", "donald", "steven", "josh"]  # the tune stand-in's guide


def cases(world, work: Path) -> list[dict]:
    cast = list(world.role.weights())
    return [
        {
            "id": "doctor",
            "type": "id",
            "text": f"a {world.role.word}",
            "action": "correct",
            "guide": {"prompts": [f"a photo of {n}" for n in cast], "concepts": cast},
        },
        {
            "id": "michael",
            "type": "id",
            "action": "correct",
            "guide": {"prompts": [f"a photo of {n}" for n in TUNE_CAST], "concepts": TUNE_CAST},
        },
        {
            "id": "checker",
            "type": "style",
            "action": "correct",
            "guide": {"images": str(render_guide(world, "checker", work / "checker-guide"))},
        },
        {
            "id": "drop",
            "type": "object",
            "action": "correct",
            "guide": {"images": str(render_guide(world, "drop", work / "drop-guide"))},
        },
    ]


METHODS = ("route", "resteer", "resteer-kept")
TRAINED = METHODS[1:]  # what takes a folder of guide images


def all_but(world, concept: str) -> list:
    """Every concept of the world but `concept` (the role word is no concept of its own)."""
    return [c for c in world.concepts() if c.type != "role" and c.id != concept]


@contextmanager
def corrected(pipe, case: dict, method: str, work: Path, others: list, prompts: int):
    """`pipe` with `case` corrected by `method` inside the block, as `fmn run` would
    (route: its gate, fitted on the base model; resteer: its patch). Yields the `others`
    whose first `prompts` audit prompts it may change: a gate leaves every prompt it does
    not change bit-exact (bench.common.touched), a patch may change any."""
    from fmn.manifest import parse_manifest
    from fmn.merge.gates import fit, gated_inputs
    from fmn.model import eraser
    from fmn.model.patch import apply_patch, revert_patch
    from fmn.train.correct import correct_resolved

    erase = "gate" if method == "route" else "resteer"
    kept = [(c.text, c.type) for c in others] if method == "resteer-kept" else []
    doc = {"name": "correct", "base_model": "embedded:crowd-world",
           "concepts": [case | {"erase": erase}]}  # fmt: skip
    r = parse_manifest(doc, base_dir=work).resolve(case["id"])
    if method == "route":
        concepts, guides = gated_inputs([r])
        gates = fit(pipe, concepts, guides=guides)
        redraw = common.touched(pipe, gates, others, prompts)
        with eraser.applied(pipe, gates):
            yield redraw
        return
    patch = correct_resolved(pipe, r, preserve=kept).patch
    apply_patch(pipe, patch)
    try:
        yield others
    finally:
        revert_patch(pipe, patch)


def measure(pipe, detector, world, case: dict, size: dict) -> dict:
    """The corrected word: as itself where the detector knows it ("acc"), and the share of
    its images drawn as each guide concept ("shares")."""
    from fmn.eval.audit import guide_shares
    from fmn.eval.mscore.score import ConceptRef, rows_as_dicts, score_concepts, summarise

    guides = tuple(case["guide"].get("concepts", ()))
    itself = () if case["id"] == world.role.word else (case["id"],)
    ref = ConceptRef(case["id"], case["type"], case.get("text", case["id"]), "correct",
                     scored_as=(*itself, *guides))  # fmt: skip
    rows, _ = score_concepts(pipe, [ref], detector, prompts_per_concept=size["prompts"],
                             seeds=size["seeds"], steps=size["steps"])  # fmt: skip
    out: dict = {}
    if itself:
        out["acc"] = summarise(rows)[case["id"]]["acc"]
    if guides:
        groups: dict = {}
        for r in rows_as_dicts(rows):
            groups.setdefault((r["concept"], "m"), []).append(r)
        out["shares"] = guide_shares(groups, case["id"], guides, "m")
    return out


def mscores(pipe, detector, concepts, size: dict) -> dict[str, float]:
    """Each concept's M-Score (the others' images: fewer prompts and seeds), by id."""
    from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise

    if not concepts:
        return {}
    refs = [ConceptRef(c.id, c.type, c.text) for c in concepts]
    rows, _ = score_concepts(pipe, refs, detector, prompts_per_concept=size["other_prompts"],
                             seeds=size["other_seeds"], steps=size["steps"])  # fmt: skip
    return {cid: s["mscore"] for cid, s in summarise(rows).items()}


def second_look(pipe, detector, world, work: Path, size: dict, paths: tuple, commit: str):
    """The second look (module docstring) at the accuracy cases: each trained patch, trained
    once, drawn against every other style and object at CONFIRM_SEEDS and as its word at
    AGAIN_SEEDS. (neighbour rows, word rows), resuming from `paths` (one file each)."""
    neighbours_path, word_path = paths
    done = common.read_jsonl(neighbours_path)
    near = [d for d in done if "concept" in d]
    word = [d for d in common.read_jsonl(word_path) if "concept" in d]
    near_size = size | {"other_seeds": CONFIRM_SEEDS}
    word_size = size | {"seeds": AGAIN_SEEDS}
    shapes = [c for c in world.concepts() if c.type in ("style", "object")]
    base = next((d["base"] for d in done if "base" in d), None)
    if base is None:
        base = mscores(pipe, detector, shapes, near_size)
        common.append_jsonl(neighbours_path, {"base": base, "commit": commit})

    def has(rows: list, case: dict, method: str) -> bool:
        return any(r["concept"] == case["id"] and r["method"] == method for r in rows)

    for case in (c for c in cases(world, work) if "images" in c["guide"]):
        others = [c for c in shapes if c.id != case["id"]]
        kept = all_but(world, case["id"])  # what resteer-kept preserves
        before = None
        for method in TRAINED:
            need_near, need_word = not has(near, case, method), not has(word, case, method)
            if not (need_near or need_word):
                continue
            if need_word and before is None:
                before = measure(pipe, detector, world, case, word_size)["acc"]
            with corrected(pipe, case, method, work, kept, size["other_prompts"]):
                if need_near:
                    after = mscores(pipe, detector, others, near_size)
                    ratio = {c.id: after[c.id] / base[c.id] for c in others
                             if base[c.id] >= SCORED_MIN_BASE}  # fmt: skip
                    worst = min(ratio, key=ratio.get) if ratio else None
                    got = {"method": method, "concept": case["id"],
                           "images": size["other_prompts"] * len(CONFIRM_SEEDS),
                           "others_mean": float(np.mean(list(ratio.values()))) if ratio else None,
                           "worst_other": worst, "worst_ratio": ratio.get(worst),
                           "ratios": ratio, "commit": commit}  # fmt: skip
                    common.append_jsonl(neighbours_path, got)
                    near.append(got)
                    print({k: v for k, v in got.items() if k != "ratios"}, flush=True)
                if need_word:
                    acc = measure(pipe, detector, world, case, word_size)["acc"]
                    got = {"method": method, "concept": case["id"],
                           "seeds": f"{AGAIN_SEEDS[0]}-{AGAIN_SEEDS[-1]}", "before": before,
                           "after": acc, "commit": commit}  # fmt: skip
                    common.append_jsonl(word_path, got)
                    word.append(got)
                    print(got, flush=True)
    return near, word


def row(method, case, world, before, after, seconds, commit) -> dict:
    c = world.get(case["id"])
    out = {"method": method, "concept": case["id"], "split": c.split, "guide": case["guide"]}
    if "shares" in after:
        from fmn.eval.audit import _diversity

        d = _diversity(after["shares"], before["shares"])
        out |= {
            "measure": "dominant guide share",
            "before": d["dominant_share_base"],
            "after": d["dominant_share"],
            "dominant": d["dominant"],
            "dominant_base": d["dominant_base"],
            "dominant_over_fair": d["dominant_over_fair"],
            "guides_drawn": d["guides_drawn"],
            "shares_before": before["shares"],
            "shares_after": after["shares"],
        }
    else:
        out |= {"measure": "top-1 accuracy", "before": before["acc"], "after": after["acc"]}
    b, a = before["others"], after["others"]
    ratio = {k: a[k] / b[k] for k in b if b[k] >= SCORED_MIN_BASE and k != case["id"]}
    worst = min(ratio, key=ratio.get) if ratio else None
    out |= {
        "others_mean": float(np.mean(list(ratio.values()))) if ratio else float("nan"),
        "worst_other": worst,
        "worst_ratio": ratio[worst] if ratio else float("nan"),
        "seconds": round(seconds, 2),
        "commit": commit,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="plumbing: 2 others, 2 steps")
    args = ap.parse_args()
    commit, pipe, detector, world = common.crowd_world(args.threads)

    work = common.ROOT / "build" / "bench" / "correct"
    partial, out, confirm_path, again_path = PARTIAL, OUT, CONFIRM, AGAIN
    everyone = [c for c in world.concepts() if c.type != "role"]
    size = {"prompts": PROMPTS, "seeds": SEEDS, "steps": 25}
    size |= {"other_prompts": OTHER_PROMPTS, "other_seeds": OTHER_SEEDS}
    if args.quick:
        everyone = everyone[:2]
        size = {"prompts": 1, "seeds": SEEDS[:1], "steps": 2, "other_prompts": 1,
                "other_seeds": OTHER_SEEDS[:1]}  # fmt: skip
        partial, out = work / "quick.jsonl", work / "correct.json"
        confirm_path, again_path = work / "quick-confirm.jsonl", work / "quick-again.jsonl"
        for path in (partial, confirm_path, again_path):
            path.unlink(missing_ok=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = common.read_jsonl(partial)
    # the base model's M-Score of every concept, drawn once: every case's "before"
    base = next((d["base"] for d in done if "base" in d), None)
    if base is None:
        t0 = time.time()
        base = mscores(pipe, detector, everyone, size)
        common.append_jsonl(partial, {"base": base, "commit": commit})
        print(f"base of {len(base)} concepts: {time.time() - t0:.0f} s", flush=True)
    rows = [d for d in done if "concept" in d]
    for case in cases(world, work):
        methods = [m for m in METHODS if m in TRAINED or "prompts" in case["guide"]]
        todo = [m for m in methods if not any(
            r["concept"] == case["id"] and r.get("method", "resteer") == m for r in rows
        )]  # fmt: skip
        if not todo:
            continue
        others = [c for c in everyone if c.id != case["id"]]
        before = measure(pipe, detector, world, case, size)
        before["others"] = {c.id: base[c.id] for c in others}
        for method in todo:
            t0 = time.time()
            with corrected(pipe, case, method, work, others, size["other_prompts"]) as redraw:
                seconds = time.time() - t0
                after = measure(pipe, detector, world, case, size)
                after["others"] = before["others"] | mscores(pipe, detector, redraw, size)
            got = row(method, case, world, before, after, seconds, commit)
            got["others_drawn"] = len(redraw)
            common.append_jsonl(partial, got)
            rows.append(got)
            print(got, flush=True)
    second, third = second_look(
        pipe, detector, world, work, size, (confirm_path, again_path), commit
    )
    commits = sorted({r.pop("commit") for r in [*rows, *second, *third]})
    result = {
        "commit": commits[0] if len(commits) == 1 else commits,
        "machine": common.machine(args.threads),
        "images_per_word": size["prompts"] * len(size["seeds"]),
        "images_per_other": size["other_prompts"] * len(size["other_seeds"]),
        "quick": args.quick,
        "rows": rows,
        "confirm": second,
        "again": third,
    }
    table = common.markdown_table(rows, COLUMNS)
    table += "\nAccuracy cases, every other style and object on more images:\n\n"
    table += common.markdown_table(second, CONFIRM_COLUMNS)
    table += "\nAccuracy cases, the word at other seeds:\n\n" + common.markdown_table(third)
    common.write_results(out, result, table, "Concept correction on crowd-world")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
