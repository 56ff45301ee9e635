"""How far can any key/value edit separate one concept from the others? (No images.)

Re-steering and every closed-form peer (UCE, MACE, SPEED, OCE) edit the cross-attention
key/value projections W, which act linearly on the text encoder's token states e. An edit
dW moves the target's keys by dW e_target and another concept's by dW e_other, so if the
target's state is a combination of the others' states, no edit moves it alone. This bench
measures, for every concept of each embedded world, the best any linear edit can do:

    worst = min over g of max over other concepts |g . e_other|, subject to g . e_target = 1

(a linear programme; e normalised to unit length), i.e. the smallest possible change of the
most-moved other concept per unit change of the target, and `rms`, the root mean square
over the others of the minimum-norm (least-squares, UCE-style) edit's changes. 0 means an
edit can move the target alone; 0.3 means some other concept moves at least 30% as much.

States: the text encoder's output at the concept's last token ("name") and at the first
end-of-text token ("eot", which the all_eot rungs edit), in the first world template of the
concept's type; the others are every other concept of the world (all types). It reads only
the text encoder: no detector, no labels, no images, so it is the same on every split.

One state at a time is a weak test: fewer concepts than the width are always linearly
independent. An edit must move the target in every prompt the audit draws it with, and
leave the others in theirs, so position "joint" asks the same of identities at once: the
target's states at the name and the first end-of-text token in every identity template of
the audit (fmn.eval.mscore.prompts.WORLD) must each move by at least 1 along one edit
direction g (g . e >= 1), and `worst` is the most any other identity's state in any of
those templates (or another concept's, in its first template) moves; `rms` is the
minimum-norm g's over all of them. One direction g is a rank-one edit, which bounds what
a wider edit could do from above.

Usage: python bench/separability.py [--threads 1]
Writes bench/results/separability.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linprog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, git_commit, machine, markdown_table, write_results

OUT = ROOT / "bench" / "results" / "separability.json"
POSITIONS = ("name", "eot")
JOINT = "joint"  # every identity template, name and end-of-text states together


def states(pipe, concepts, template: int = 0) -> dict[str, np.ndarray]:
    """position -> [len(concepts), width] unit-length token states, in each concept's
    `template`-th world template."""
    from fmn.eval.mscore.prompts import WORLD
    from fmn.model.conditioning import concept_token_ids, token_ids

    tok, te = pipe.tokenizer, pipe.text_encoder
    prompts = [WORLD.templates[c.type][template].format(c.text) for c in concepts]
    ids = token_ids(tok, prompts)
    with torch.no_grad():
        hidden = te(ids)[0].double()
    eot = tok.eos_token_id
    out = {p: [] for p in POSITIONS}
    for i, c in enumerate(concepts):
        row = ids[i].tolist()
        last = concept_token_ids(tok, c.text)[-1]
        name = max(j for j, t in enumerate(row) if t == last)
        out["name"].append(hidden[i, name])
        out["eot"].append(hidden[i, row.index(eot)])
    return {p: _unit(torch.stack(v).numpy()) for p, v in out.items()}


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def minimax(target: np.ndarray, others: np.ndarray) -> float:
    """min_g max_i |others_i . g| subject to target_k . g >= 1 for every row k of target
    (one state [d], or several [k, d] for the joint test; with one, g . target = 1 at the
    optimum). Variables g, t; minimise t."""
    target = np.atleast_2d(target)
    n, d = others.shape
    cost = np.r_[np.zeros(d), 1.0]
    bound = np.r_[
        np.c_[others, -np.ones(n)],
        np.c_[-others, -np.ones(n)],
        np.c_[-target, np.zeros(len(target))],
    ]
    res = linprog(
        cost,
        A_ub=bound,
        b_ub=np.r_[np.zeros(2 * n), -np.ones(len(target))],
        bounds=[(None, None)] * d + [(0, None)],
    )
    if not res.success:  # the target outside the others' span: an edit can move it alone
        return 0.0
    return float(res.x[-1])


def least_squares(target: np.ndarray, others: np.ndarray) -> float:
    """RMS of the others' changes under the minimum-norm edit g with target_k . g = 1 for
    every row k of target (one state [d], or several [k, d])."""
    target = np.atleast_2d(target)
    gram = others.T @ others + 1e-9 * np.eye(others.shape[1])
    inv_t = np.linalg.solve(gram, target.T)  # [d, k]
    g = inv_t @ np.linalg.solve(target @ inv_t, np.ones(len(target)))
    return float(np.sqrt(np.mean((others @ g) ** 2)))


def measure(world) -> list[dict]:
    from fmn.model.load import load_pipeline

    pipe = load_pipeline(f"embedded:{world.name}")
    concepts = [c for c in world.concepts() if c.type != "role"]
    width = pipe.text_encoder.config.hidden_size
    rows = []
    for pos, e in states(pipe, concepts).items():
        for i, c in enumerate(concepts):
            others = np.delete(e, i, axis=0)
            rows.append(
                _row(world, width, concepts, pos, c)
                | {"worst": minimax(e[i], others), "rms": least_squares(e[i], others)}
            )
    return rows + measure_joint(world, pipe, concepts, width)


def _row(world, width: int, concepts, position: str, c) -> dict:
    return {
        "world": world.name,
        "width": width,
        "concepts": len(concepts),
        "position": position,
        "concept": c.id,
        "type": c.type,
        "split": c.split,
    }


def measure_joint(world, pipe, concepts, width: int) -> list[dict]:
    """Position "joint": identities, in every audit template at once (module docstring)."""
    from fmn.eval.mscore.prompts import WORLD

    ids = [i for i, c in enumerate(concepts) if c.type == "id"]
    first = states(pipe, concepts)
    per = [states(pipe, [concepts[i] for i in ids], t) for t in range(len(WORLD.templates["id"]))]
    # [states, width] per concept: an identity's in every template; another type's first
    own = [np.stack([first[pos][i] for pos in POSITIONS]) for i in range(len(concepts))]
    for k, i in enumerate(ids):
        own[i] = np.stack([p[pos][k] for p in per for pos in POSITIONS])
    rows = []
    for i in ids:
        others = np.concatenate([e for j, e in enumerate(own) if j != i])
        rows.append(
            _row(world, width, concepts, JOINT, concepts[i])
            | {"worst": minimax(own[i], others), "rms": least_squares(own[i], others)}
        )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["world"], r["position"], r["type"], r["split"]) for r in rows)
    for world, pos, typ, split in keys:
        mine = [
            r
            for r in rows
            if (r["world"], r["position"], r["type"], r["split"]) == (world, pos, typ, split)
        ]
        worst = np.array([r["worst"] for r in mine])
        out.append(
            {
                "world": world,
                "width": mine[0]["width"],
                "concepts": mine[0]["concepts"],
                "position": pos,
                "type": typ,
                "split": split,
                "n": len(mine),
                "worst_median": float(np.median(worst)),
                "worst_min": float(worst.min()),
                "worst_max": float(worst.max()),
                "share_below_0.1": float(np.mean(worst < 0.1)),
                "rms_median": float(np.median([r["rms"] for r in mine])),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fmn.world.concepts import CROWD, TINY

    rows = measure(TINY) + measure(CROWD)
    result = {
        "commit": git_commit(),
        "machine": machine(args.threads),
        "summary": summary(rows),
        "rows": rows,
    }
    write_results(
        args.out,
        result,
        markdown_table(result["summary"]),
        "Separability of each concept's text states under key/value edits",
    )
    print(markdown_table(result["summary"]))


if __name__ == "__main__":
    main()
