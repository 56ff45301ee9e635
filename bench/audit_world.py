"""A full-size audit on the embedded world, timed: carol forgotten (one patch), the other
23 world concepts preserved, 10 prompts x 4 seeds per concept, 25 steps (the manifest
defaults), on both models, plus the recovery attack on carol with the manifest's default
inversion (300 steps). Then the recovery attack's curve: how many TI steps bring carol
back on the patched model, and the same inversion on the unpatched base as a control.
Writes bench/results/audit_world.json and the report to build/bench-audit/.

Usage: python bench/audit_world.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fmn.eval.audit import audit
from fmn.manifest import parse_manifest
from fmn.model.load import load_pipeline
from fmn.model.patch import save_patch
from fmn.train.forget import forget_concept
from fmn.train.resteer import ResteerConfig
from fmn.world import EMBEDDED_NAME
from fmn.world.concepts import world_concepts

TARGET = "carol"
CURVE_STEPS = (1, 5, 20, 100)


def _manifest(name: str, preserve: bool, **evaluate):
    others = [{"id": c.id, "type": c.type} for c in world_concepts() if c.id != TARGET]
    m = {
        "name": name,
        "base_model": EMBEDDED_NAME,
        "concepts": [{"id": TARGET, "type": "id"}],
        "preserve": others if preserve else [],
        "evaluate": evaluate,
    }
    return parse_manifest(m, base_dir=".")


def _recovery(res) -> dict:
    c = res.summary["concepts"][TARGET]
    return {
        "mscore": c["mscore"],
        "recovery_mscore": c.get("recovery_mscore"),
        "recovery_acc": c.get("recovery_acc"),
        "ti": c.get("recovery"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="build/bench-audit")
    ap.add_argument("--out", default="bench/results/audit_world.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    t = time.time()
    pipe = load_pipeline(EMBEDDED_NAME)
    forgotten = forget_concept(
        pipe, TARGET, "id", TARGET, ResteerConfig(), generate=16, mask="none"
    )
    patch = save_patch(forgotten.patch, work / TARGET)
    forget_seconds = time.time() - t
    del pipe

    full = audit(_manifest("world-audit", True), patch=patch, out=work / "report", recovery=True)
    s = full.summary
    kept = {c: v["ratio"] for c, v in s["concepts"].items() if v["role"] == "preserve"}
    worst = min(kept, key=kept.get)
    timings = s["timings"]
    record = {
        "setup": {
            "target": TARGET,
            "concepts": len(s["concepts"]),
            "prompts_per_concept": s["evaluate"]["prompts_per_concept"],
            "seeds": s["evaluate"]["seeds"],
            "steps": s["evaluate"]["steps"],
            "images_scored": s["evaluate"]["images"],
            "threads": 1,
        },
        "forget_seconds": round(forget_seconds, 1),
        "audit_seconds": timings,
        "audit_seconds_without_recovery": round(timings["total"] - timings["recovery"], 1),
        "target": _recovery(full),
        "targets": s["targets"],
        "preserve": s["preserve"],
        "worst_preserved": {"concept": worst, "ratio": kept[worst]},
        "gates": s["gates"],
    }
    print(json.dumps(record, indent=2), flush=True)

    small = {"prompts_per_concept": 4, "seeds": [0, 1, 2, 3]}
    curve = []
    for steps in CURVE_STEPS:
        res = audit(_manifest("curve", False, **small), patch=patch, recovery=True,
                    recovery_steps=steps)  # fmt: skip
        curve.append({"ti_steps": steps, **_recovery(res)})
        print(json.dumps(curve[-1]), flush=True)
    control = audit(_manifest("control", False, **small), model=EMBEDDED_NAME, recovery=True,
                    recovery_steps=20)  # fmt: skip
    record["recovery_curve_patched"] = curve
    record["recovery_on_unpatched_base_20_steps"] = _recovery(control)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}; report in {work / 'report'}")


if __name__ == "__main__":
    main()
