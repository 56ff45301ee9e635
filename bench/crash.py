"""Crash safety of `fmn run`: SIGKILL at seeded random points, re-run, verify every output.

Each trial starts a fresh build of a tiny world manifest (2 concepts), kills the whole
process group after a random delay drawn (seeded) from [0.5 s, 85% of a full build], then
runs the same command again and checks: it exits 0; every patch's hash equals the one
merge.json records; the merged patch's hash and the merged model's fingerprint equal
their records; summary.json parses; no temp file of an atomic write is left anywhere.
Then two builds of different manifests run at once (both must complete and verify), and
two of the same run folder (the second must refuse with exit 2).
Writes bench/results/crash.json. Usage: python bench/crash.py [--trials 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script

from bench.common import git_commit  # noqa: E402

FMN = [sys.executable, "-m", "fmn.cli", "run"]


def manifest(path: Path, name: str, concepts: list[tuple[str, str]]) -> Path:
    doc = {
        "name": name,
        "base_model": "embedded:tiny-world",
        "defaults": {"resteer": {"steps": 4, "mask": "none"}},
        "concepts": [{"id": i, "type": t, "images": {"generate": 4}} for i, t in concepts],
        "preserve": [{"id": "alice", "type": "id"}],
        "evaluate": {"prompts_per_concept": 1, "seeds": [0], "steps": 4},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start(m: Path, out: Path, env: dict) -> subprocess.Popen:
    cmd = [*FMN, str(m), "--out", str(out / "run"), "--report", str(out / "report")]
    return subprocess.Popen(
        [*cmd, "--no-fail-on-gates"],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def verify(out: Path) -> tuple[int, list[str]]:
    """(files verified, problems) of a finished build in `out`."""
    from fmn.model.load import fingerprint, load_pipeline
    from fmn.model.patch import patch_hash

    run, problems, n = out / "run", [], 0
    merge = json.loads((run / "merged" / "merge.json").read_text())
    for c in merge["concepts"]:
        n += 1
        if patch_hash(run / "patches" / c["id"]) != c["hash"]:
            problems.append(f"patch {c['id']}: hash differs from merge.json")
    n += 1
    if patch_hash(run / "merged") != merge["patch_hash"]:
        problems.append("merged patch: hash differs from merge.json")
    recorded = json.loads((run / "merged.json").read_text())
    n += 1
    if fingerprint(load_pipeline(str(run / "merged" / "model"))) != recorded["model_fingerprint"]:
        problems.append("merged model: fingerprint differs from merged.json")
    n += 1
    json.loads((out / "report" / "summary.json").read_text())
    temps = [
        p
        for p in out.rglob(".*")
        if p.name.endswith(".tmp") or ".old." in p.name  # fmn.io's atomic-write leftovers
    ]
    problems += [f"temp file left: {p}" for p in temps]
    return n, problems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/crash.json")
    args = ap.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    tmp = Path(tempfile.mkdtemp(prefix="fmn-crash-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "FMN_DEVICE_SLOT": ""}
        env["PYTHONPATH"] = str(ROOT)
        m = manifest(tmp / "crash.yaml", "crash", [("carol", "id"), ("triangle", "object")])
        t0 = time.time()
        calib = start(m, tmp / "calibration", env)
        calib.wait()
        full = time.time() - t0
        print(f"a full build takes {full:.1f} s (exit {calib.returncode})", flush=True)
        rng = random.Random(args.seed)
        trials = []
        for i in range(args.trials):
            out = tmp / f"trial{i}"
            # inside the build: a kill after it ended would test nothing
            delay = rng.uniform(0.5, 0.85 * full)
            p = start(m, out, env)
            time.sleep(delay)
            killed = p.poll() is None
            if killed:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            again = start(m, out, env)
            log, _ = again.communicate()
            n, problems = verify(out) if again.returncode == 0 else (0, [log[-2000:]])
            row = {
                "trial": i,
                "kill_after_s": round(delay, 2),
                "killed": killed,
                "rerun_exit": again.returncode,
                "files_verified": n,
                "problems": problems,
            }
            trials.append(row)
            print(json.dumps(row), flush=True)

        # two different manifests at once; then two runs of one run folder
        m2 = manifest(tmp / "other.yaml", "other", [("outline", "style")])
        a, b = start(m, tmp / "par-a", env), start(m2, tmp / "par-b", env)
        a.wait(), b.wait()
        parallel = {
            "exits": [a.returncode, b.returncode],
            "problems": verify(tmp / "par-a")[1] + verify(tmp / "par-b")[1],
        }
        first = start(m, tmp / "same", env)
        time.sleep(3)
        second = start(m, tmp / "same", env)
        msg, _ = second.communicate()
        first.wait()
        same = {"first_exit": first.returncode, "second_exit": second.returncode}
        same["second_message"] = msg.strip().splitlines()[-1] if msg.strip() else ""
    ok = [t for t in trials if t["rerun_exit"] == 0 and not t["problems"]]
    result = {
        "commit": git_commit(),
        "full_build_seconds": round(full, 1),
        "trials": len(trials),
        "killed_mid_run": sum(t["killed"] for t in trials),
        "completed_and_verified": len(ok),
        "files_verified": sum(t["files_verified"] for t in trials),
        "parallel_different_manifests": parallel,
        "same_run_folder": same,
        "rows": trials,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
