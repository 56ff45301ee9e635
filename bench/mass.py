"""Mass removal on crowd-world: N identities erased in one model, side by side with
re-implemented closed-form peers on the same world, prompts and seeds (issue #18).

Targets: crowd-world's held-out identities in an order drawn with SHUFFLE_SEED; N = 1, 10,
50, 100 are nested prefixes of it. Preserved (measured, never given to any method): the
held-out identities after the first 100 (28 of them) plus every object and style of the
world. The tune split beside it: tune identities, N = 10 and 40, preserved = the tune
identities after the first 40 (24) plus every object and style.

Every method gets the same inputs: the targets' names, the type "id", and as preservation
only the product's generic anchor prompts (the empty prompt and plain words in the
templates, fmn.data.anchors.anchor_prompts), never a measured concept. Methods:

- ours: what `fmn run` does by default for a manifest of these identities (`erase: auto`,
  which gates identities, objects and styles): the merge stage's gated text-state eraser
  (fmn.model.eraser, fitted by fmn.merge.gates) from the targets' names, their type's
  templates and the tokenizer's vocabulary. The vocabulary's states are computed once per
  process, and every row's time includes that once (stage "vocabulary").
- ours-2tpl: the same, fitted on 2 of the type's 4 templates, so half the audit's prompts
  are ones the gates never saw (how far a gate reaches beyond its own prompts).
- loop: what `fmn run` did by default before the gate (`erase: resteer`): per concept the
  closed-loop re-steering (fmn.train.loop), a concept the loop refuses ships nothing; then
  the default closed-form merge (`merge:` defaults).
- sum: the fixed re-steering recipe per concept (`resteer.loop: false`), deltas summed.
- fmn-joint: the seed's joint re-steering, every target in one run (`merge.method: joint`).
- uce: Unified Concept Editing (Gandikota et al., WACV 2024), its closed form: for every
  cross-attention key/value projection W,
      W' = (lam W + sum_i W c*_i c_i^T + s_p sum_p W c_p c_p^T)
           (lam I + sum_i c_i c_i^T + s_p sum_p c_p c_p^T)^-1
  c_i: the text states of each target prompt from the target's last token to the end, c*_i
  the anchor prompt's ("a person" in the same template) from its last token, aligned;
  c_p: every position of the preservation prompts. lam 0.5, erase scale 1, s_p 0.1, as
  the published erasing script runs it. Not as published: the anchor is the product's
  ("a person", where the script's default is the empty prompt) and the prompts are the
  type's templates (where it uses the bare name), the same for every method.
- mace-cf: MACE's closed-form cross-attention refinement (Lu et al., CVPR 2024),
  without its Grounded-SAM LoRA stage: the same solve, but c_i are the positions the
  target prompt shares with its anchor prompt (the prefix, and every position after the
  concept, aligned from the end), so the concept's residual in the surrounding tokens is
  mapped to the anchor's, and the preservation prompts map to themselves; lam 0.5, s_p 1
  (the defaults of the published closed-form function).
- probe-token: no method, a probe of where the wall is. Every cross-attention key/value
  edit (all of the above) is linear in the text states, and crowd-world's states are
  entangled (docs/resteer.md, bench/separability.py). This edits the text side instead:
  each target's name token's input-embedding row becomes the anchor word's ("person"),
  so a prompt without a target name is encoded exactly as before. It says what a
  text-side edit could reach on this world; it is no candidate as it stands (a textual
  inversion, or any other word for the person, goes around it).
- uce-list, mace-cf-list: the same, with a preserve list as a user would give one: 64
  identities no row of the split measures (the other split's) join the preservation
  prompts (in the preservation templates of fmn.data.anchors).

Every W of a Stable-Diffusion UNet's cross-attention reads the same text states, so both
peers are dW = W (A B^-1 - I) with one D x D pair (A, B) for all layers.

Measures per (split, method, N): Acc_e (top-1 of the world classifier on the targets'
images), Acc_s (top-1 on the preserved concepts', as a ratio to the base model's), H (the
harmonic mean of 1 - Acc_e and the Acc_s ratio), the worst preserved concept (its M-Score
ratio to base), seconds of each build stage and of the whole build, peak RSS of the
build. Images: PROMPTS templates x SEEDS per concept, 25 DDIM steps.

The bench resumes: patches are kept under build/bench/mass/<world>/ (the base model's
fingerprint, so a rebuilt world never reuses another's patches), every finished row and
the base scores go to bench/partial/mass-<world>.jsonl (tracked, so a later session
resumes it) with the commit they ran on. Two processes may
run side by side with disjoint --methods (one thread each).

Usage: python bench/mass.py [--methods ours uce ...] [--ns 1 10 50 100] [--splits heldout tune]
       [--threads 1] [--quick]
Writes bench/results/mass.json and mass.md with the rows that are in; rows not run yet are
listed there (`missing`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    PARTIALS,
    ROOT,
    PeakRSS,
    append_jsonl,
    crowd_world,
    machine,
    markdown_table,
    read_jsonl,
    write_results,
)
from fmn.data.anchors import ERASE_ANCHORS, anchor_prompts
from fmn.eval.mscore.score import ConceptRef, score_concepts, summarise
from fmn.manifest import Merge, ResteerOptions, option_default
from fmn.merge import gates
from fmn.merge.fuse import MergeConfig, merge_patches
from fmn.model import eraser
from fmn.model.conditioning import concept_prompts, encode_text
from fmn.model.load import fingerprint
from fmn.model.patch import Patch, apply_patch, revert_patch, save_patch
from fmn.train.forget import forget_concept, forget_joint
from fmn.train.loop import NotForgotten
from fmn.train.resteer import ResteerConfig

SEEDS = (1000, 1001)  # the measuring rule: reported numbers at image seeds >= 1000
PROMPTS = 6  # 6 templates x 2 seeds = 12 images per concept
SHUFFLE_SEED = 0
NS = {"heldout": (1, 10, 50, 100), "tune": (10, 40)}
METHODS = (
    "ours",
    "ours-2tpl",
    "loop",
    "uce",
    "mace-cf",
    "fmn-joint",
    "sum",
    "uce-list",
    "mace-cf-list",
    "probe-token",
)
PEERS = {  # (lam, preserve scale) as published
    "uce": (0.5, 0.1),  # its script calls its edit with lam 0.5 (the function's default is 0.1)
    "mace-cf": (0.5, 1.0),
}
LISTED = 64  # -list variants: this many identities of the other split added to preservation
WORK = ROOT / "build" / "bench" / "mass"  # then the world's fingerprint
OUT = ROOT / "bench" / "results" / "mass.json"
COLUMNS = [
    "split",
    "method",
    "n_targets",
    "acc_e",
    "acc_e_base",
    "acc_s_ratio",
    "worst_preserved",
    "worst_ratio",
    "h",
    "seconds",
    "peak_mb",
    "shipped",
]


def plan(world, split: str) -> tuple[list, list]:
    """(targets in their drawn order, preserved concepts) of a split."""
    ids = [c for c in world.concepts() if c.type == "id" and c.split == split]
    random.Random(SHUFFLE_SEED).shuffle(ids)
    n_max = max(NS[split])
    others = [c for c in world.concepts() if c.type in ("object", "style")]
    return ids[:n_max], ids[n_max:] + others


def score(pipe, detector, concepts, size: dict) -> dict[str, dict]:
    refs = [ConceptRef(c.id, c.type, c.text) for c in concepts]
    rows, _ = score_concepts(
        pipe,
        refs,
        detector,
        prompts_per_concept=size["prompts"],
        seeds=size["seeds"],
        steps=size["steps"],
    )
    return {cid: {"mscore": s["mscore"], "acc": s["acc"]} for cid, s in summarise(rows).items()}


# ---- per-concept patches (cached on disk) ----------------------------------------------


def concept_patch(pipe, concept, kind: str, steps: int | None, work: Path) -> dict:
    """The concept's re-steering patch (kind "fixed" or "loop"), made once: {path or None
    where the loop refused it, seconds, peak_mb, status}."""
    folder = work / kind
    marker = folder / f"{concept.id}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    opts = ResteerOptions(loop=kind == "loop", **({"steps": steps} if steps else {}))
    cfg = ResteerConfig.from_options(concept.type, opts)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        try:
            res = forget_concept(
                pipe,
                concept.id,
                concept.type,
                concept.text,
                cfg,
                mask=option_default(ResteerOptions, "mask"),
            )
            path, status = str(save_patch(res.patch, folder / concept.id)), "shipped"
        except NotForgotten as e:
            path, status = None, f"refused: {e.result.loop['reason']}"
    record = {
        "path": path,
        "seconds": time.perf_counter() - t0,
        "peak_mb": mem.mb,
        "status": status,
    }
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record))
    return record


# ---- the closed-form peers, written from their papers' equations -------------------------


def _states(pipe, prompts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
    cond = encode_text(pipe, prompts)
    ids = [pipe.tokenizer(p).input_ids for p in prompts]  # unpadded: BOS ... EOS
    return cond.embeds.detach().double(), ids


def _uce_pairs(old: torch.Tensor, new: torch.Tensor, ids_old, ids_new):
    """UCE: from each prompt's last concept token (the one before EOS) to the end, the
    longer one cut so both have the same length."""
    i, j = len(ids_old) - 2, len(ids_new) - 2
    far, length = max(i, j), old.shape[0]
    return old[i : length - (far - i)], new[j : length - (far - j)]


def _mace_pairs(old: torch.Tensor, new: torch.Tensor, ids_old, ids_new):
    """MACE: the positions the two prompts share (common prefix, and from the first common
    suffix token on, aligned from the end), extended to the padded length."""
    pre = 0
    while pre < min(len(ids_old), len(ids_new)) and ids_old[pre] == ids_new[pre]:
        pre += 1
    a, b = len(ids_old) - 1, len(ids_new) - 1
    while a >= pre and b >= pre and ids_old[a] == ids_new[b]:
        a, b = a - 1, b - 1
    length = old.shape[0]
    shift = (a + 1) - (b + 1)  # old positions after the concept sit `shift` later
    tail_old = list(range(a + 1, length - max(0, -shift)))
    tail_new = [k - shift for k in tail_old]
    keep = [k for k, m in zip(tail_old, tail_new, strict=True) if 0 <= m < length]
    rows_old = list(range(pre)) + keep
    rows_new = list(range(pre)) + [k - shift for k in keep]
    return old[rows_old], new[rows_new]


def listed(world, split: str) -> list:
    """The preserve list of the -list variants: identities none of the split's rows
    measures (the other split's: all tune identities for held-out rows, the first held-out
    targets for tune rows)."""
    other = "tune" if split == "heldout" else "heldout"
    return plan(world, other)[0][:LISTED]


def peer_patch(pipe, method: str, targets, keep_listed=()) -> Patch:
    """The peer's dense deltas as a Patch (to_k/to_v of every cross-attention layer).
    keep_listed: identities whose prompts join the preservation prompts (-list variants)."""
    lam, s_p = PEERS[method.removesuffix("-list")]
    pairs = _uce_pairs if method.startswith("uce") else _mace_pairs
    dim = pipe.text_encoder.config.hidden_size
    a = torch.zeros(dim, dim, dtype=torch.float64)  # sum c* c^T  (values are W c*)
    b = torch.zeros(dim, dim, dtype=torch.float64)  # sum c c^T
    for c in targets:
        old_prompts = concept_prompts(c.text, "id")
        new_prompts = concept_prompts(ERASE_ANCHORS["id"], "id")
        old, ids_old = _states(pipe, old_prompts)
        new, ids_new = _states(pipe, new_prompts)
        for k in range(len(old_prompts)):
            e_old, e_new = pairs(old[k], new[k], ids_old[k], ids_new[k])
            a += e_new.T @ e_old
            b += e_old.T @ e_old
    keep, _ = _states(pipe, anchor_prompts(preserve=[(c.text, c.type) for c in keep_listed]))
    keep = keep.reshape(-1, dim)
    p = keep.T @ keep
    eye = torch.eye(dim, dtype=torch.float64)
    lhs = lam * eye + b + s_p * p
    m = torch.linalg.solve(lhs, (lam * eye + a + s_p * p), left=False) - eye  # (A B^-1 - I)
    deltas = {
        name: (w.detach().double() @ m).float()
        for name, w in pipe.unet.named_parameters()
        if "attn2.to_k" in name or "attn2.to_v" in name
    }
    return Patch(
        concept=",".join(c.id for c in targets),
        method=method,
        deltas=deltas,
        config={"lam": lam, "preserve_scale": s_p},
        base_fingerprint=fingerprint(pipe),
    )


class TokenRows:
    """probe-token's edit: the targets' name-token embedding rows set to the anchor word's
    while applied (`apply` / `revert`, as a Patch is applied and reverted)."""

    def __init__(self, pipe, targets) -> None:
        tok = pipe.tokenizer
        self.rows = pipe.text_encoder.get_input_embeddings().weight
        (self.anchor,) = tok(ERASE_ANCHORS["id"].split()[-1], add_special_tokens=False).input_ids
        self.ids = [tok(c.text, add_special_tokens=False).input_ids for c in targets]
        if any(len(i) != 1 for i in self.ids):  # the world's names are one token each
            raise SystemExit("probe-token needs one-token names")
        self.ids = [i[0] for i in self.ids]
        self.saved = self.rows[self.ids].detach().clone()

    def apply(self) -> None:
        with torch.no_grad():
            self.rows[self.ids] = self.rows[self.anchor].detach().clone()

    def revert(self) -> None:
        with torch.no_grad():
            self.rows[self.ids] = self.saved


class GateEdit:
    """ours: the eraser, installed while applied (as a Patch is applied)."""

    vocabulary_seconds: float | None = None  # the vocabulary's states, once per process

    def __init__(self, pipe, targets, templates: int | None = None) -> None:
        self.pipe = pipe
        if GateEdit.vocabulary_seconds is None:
            t0 = time.perf_counter()
            gates.vocabulary_states(pipe, "id")
            GateEdit.vocabulary_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.eraser = gates.fit(
            pipe, [(c.id, "id", [c.text]) for c in targets], templates=templates
        )
        self.seconds = time.perf_counter() - t0  # the fit alone

    def apply(self) -> None:
        eraser.install(self.pipe, self.eraser)

    def revert(self) -> None:
        eraser.remove(self.pipe)


# ---- one build per (method, N) ------------------------------------------------------------


def build(pipe, method: str, targets, steps: int | None, work: Path, keep_listed=()) -> dict:
    """The merged patch of `method` for these targets, with its stage times."""
    stages: dict[str, float] = {}
    peaks: list[float] = []
    shipped = len(targets)
    if method == "probe-token":
        return {"patch": TokenRows(pipe, targets), "stages": {"edit": 0.0}, "peak_mb": 0.0,
                "shipped": shipped}  # fmt: skip
    if method in ("ours", "ours-2tpl"):
        with PeakRSS() as mem:
            edit = GateEdit(pipe, targets, 2 if method == "ours-2tpl" else None)
        stages["edit"], stages["vocabulary"] = edit.seconds, GateEdit.vocabulary_seconds
        return {"patch": edit, "stages": stages, "peak_mb": mem.mb, "shipped": shipped}
    if method.removesuffix("-list") in PEERS:
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            patch = peer_patch(pipe, method, targets, keep_listed)
        stages["edit"], peaks = time.perf_counter() - t0, [mem.mb]
    elif method == "fmn-joint":
        opts = ResteerOptions(loop=False, **({"steps": steps} if steps else {}))
        cfgs = [ResteerConfig.from_options("id", opts) for _ in targets]
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            patch = forget_joint(pipe, [(c.id, c.type, c.text) for c in targets], cfgs)
        stages["prepare+resteer"], peaks = time.perf_counter() - t0, [mem.mb]
    else:
        kind = "loop" if method == "loop" else "fixed"
        records = [concept_patch(pipe, c, kind, steps, work) for c in targets]
        paths = [r["path"] for r in records if r["path"]]
        shipped = len(paths)
        stages["prepare+resteer"] = sum(r["seconds"] for r in records)
        peaks = [r["peak_mb"] for r in records]
        cfg = MergeConfig(method="sum") if method == "sum" else MergeConfig.from_manifest(Merge())
        if not paths:
            return {"patch": None, "stages": stages, "peak_mb": max(peaks), "shipped": 0}
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            patch = merge_patches(pipe, paths, cfg).patch
        stages["merge"] = time.perf_counter() - t0
        peaks.append(mem.mb)
    return {"patch": patch, "stages": stages, "peak_mb": max(peaks), "shipped": shipped}


def _ratio(x: float, base: float) -> float:
    return x / base if base > 0 else float("nan")  # (only --quick's 2-step images read 0)


def row(split, method, targets, preserved, base, patched, built) -> dict:
    acc_e = float(np.mean([patched[c.id]["acc"] for c in targets]))
    acc_s = float(np.mean([patched[c.id]["acc"] for c in preserved]))
    acc_s_base = float(np.mean([base[c.id]["acc"] for c in preserved]))
    ratios = {c.id: _ratio(patched[c.id]["mscore"], base[c.id]["mscore"]) for c in preserved}
    worst = min(ratios, key=lambda c: np.nan_to_num(ratios[c], nan=np.inf))
    s_ratio = _ratio(acc_s, acc_s_base)
    h = 2 * (1 - acc_e) * s_ratio / ((1 - acc_e) + s_ratio) if (1 - acc_e) + s_ratio else 0.0
    return {
        "split": split,
        "method": method,
        "n_targets": len(targets),
        "acc_e": acc_e,
        "acc_e_base": float(np.mean([base[c.id]["acc"] for c in targets])),
        "acc_s_ratio": s_ratio,
        "worst_preserved": worst,
        "worst_ratio": ratios[worst],
        "h": h,
        "seconds": round(sum(built["stages"].values()), 2),
        "stages": {k: round(v, 2) for k, v in built["stages"].items()},
        "peak_mb": round(built["peak_mb"], 1),
        "shipped": built["shipped"],
    }


def read_rows(partial: Path) -> list[dict]:
    """The partial file's records, rows under today's method names: up to commit cde8b13
    "ours" was the closed loop (now "loop"), and that commit measured the gate as "gate"
    (now "ours", what `fmn run` does by default)."""
    out = []
    for d in read_jsonl(partial):
        if d.get("method") == "ours" and "prepare+resteer" in d.get("stages", {}):
            d = {**d, "method": "loop"}
        elif d.get("method") == "gate":
            d = {**d, "method": "ours"}
        out.append(d)
    return out


def ns_of(split: str, args) -> list[int]:
    """The N of a split this run does: the split's, or those asked for; 1 and 2 in --quick."""
    return [1, 2] if args.quick else [n for n in NS[split] if not args.ns or n in args.ns]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--splits", nargs="+", default=list(NS), choices=list(NS))
    ap.add_argument("--ns", nargs="+", type=int, help="only these N (default: the split's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="plumbing: 2-step images, N <= 2")
    ap.add_argument("--redo", nargs="+", default=[], choices=METHODS, help="run these again")
    args = ap.parse_args()
    commit, pipe, detector, world = crowd_world(args.threads)
    world_fp = fingerprint(pipe)
    fp = world_fp.removeprefix("sha256:")
    partial = PARTIALS / f"mass-{fp}.jsonl"
    size = {"prompts": PROMPTS, "seeds": SEEDS, "steps": 25}
    steps, work = None, WORK / fp
    if args.quick:  # its 2-step patches and rows are kept apart from the real ones
        work = work / "quick"
        partial = work / "partial.jsonl"
        size, steps = {"prompts": 1, "seeds": SEEDS[:1], "steps": 2}, 2
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = read_rows(partial)
    rows = [d for d in done if "method" in d and d.get("quick", False) == args.quick]
    rows = [r for r in rows if r["method"] not in args.redo]  # (the latest row of a key counts)
    for split in args.splits:
        targets, preserved = plan(world, split)
        ns = ns_of(split, args)
        if args.quick:
            preserved = preserved[:3]
        key = f"base:{split}:{'quick' if args.quick else 'full'}"
        base = next((d[key] for d in done if key in d), None)
        if base is None:
            t0 = time.time()
            base = score(pipe, detector, (targets[:2] if args.quick else targets) + preserved, size)
            append_jsonl(partial, {key: base, "commit": commit})
            print(f"{key}: {len(base)} concepts in {time.time() - t0:.0f} s", flush=True)
        for method in args.methods:
            for n in ns:
                if any(
                    (r["split"], r["method"], r["n_targets"]) == (split, method, n) for r in rows
                ):
                    continue
                keep = listed(world, split) if method.endswith("-list") else ()
                built = build(pipe, method, targets[:n], steps, work, keep)
                if built["patch"] is None:  # nothing shipped: the base model is the result
                    patched = base
                else:
                    edit = built["patch"]
                    apply_patch(pipe, edit) if isinstance(edit, Patch) else edit.apply()
                    try:
                        patched = score(pipe, detector, targets[:n] + preserved, size)
                    finally:
                        revert_patch(pipe, edit) if isinstance(edit, Patch) else edit.revert()
                r = row(split, method, targets[:n], preserved, base, patched, built)
                r.update(commit=commit, quick=args.quick)
                append_jsonl(partial, r)
                rows.append(r)
                print(json.dumps(r), flush=True)
    if args.quick:
        print(f"{len(rows)} quick rows in (nothing is written)")
        return
    # every row of the whole plan that is in, whichever process ran it
    want = [(s, m, n) for s in NS for m in METHODS for n in NS[s]]
    # other processes' rows too; where a key was run again (--redo), its latest row
    every = [r for r in read_rows(partial) if "method" in r and not r.get("quick")]
    latest = {(r["split"], r["method"], r["n_targets"]): r for r in every}
    have = [r for k, r in latest.items() if k in want]
    got = {(r["split"], r["method"], r["n_targets"]) for r in have}
    commits = sorted({r["commit"] for r in have})
    order = {m: i for i, m in enumerate(METHODS)}
    have.sort(key=lambda r: (r["split"] != "heldout", r["n_targets"], order[r["method"]]))
    result = {
        "commit": commits[0] if len(commits) == 1 else commits,
        "world": world_fp,
        "machine": machine(args.threads),
        "images_per_concept": size["prompts"] * len(size["seeds"]),
        "seeds": list(size["seeds"]),
        "shuffle_seed": SHUFFLE_SEED,
        "missing": [f"{s} {m} N={n}" for s, m, n in want if (s, m, n) not in got],
        "rows": have,
    }
    table = markdown_table(have, COLUMNS)
    if result["missing"]:  # a resumable run not finished yet says so in its table
        table += "\nNot run yet: " + ", ".join(result["missing"]) + ".\n"
    write_results(OUT, result, table, "Mass removal on crowd-world")
    print(f"wrote {OUT} and {OUT.with_suffix('.md')}")


if __name__ == "__main__":
    main()
