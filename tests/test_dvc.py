"""The DVC pipeline in a temporary git repository: `dvc repro` of a forget stage on a small
manifest runs `fmn run`, `dvc metrics show` prints the build's headline numbers (a few
columns, not one per concept), and after a second build (one more concept) `dvc metrics
diff` and `dvc plots diff` compare the two."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from tests.flow_helpers import ROOT, subprocess_env, write_manifest

DVC = str(ROOT / ".venv" / "bin" / "dvc")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    return _run(cmd, cwd, env, timeout).stdout


def _repo(tmp: Path) -> Path:
    """The project's pipeline files and the code its stages depend on, in a new repo."""
    repo = tmp / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("fmn", "tasks", "flows", "data"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    shutil.copytree(ROOT / "docs" / "worlds", repo / "docs" / "worlds")  # world stages' grids
    for name in ("dvc.yaml", "dvc.lock", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # forget@small is built; forget@never never is, like a shipped manifest nobody built yet
    params["manifests"] = ["small", "never"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "manifests").mkdir()
    write_manifest(repo / "manifests" / "small.yaml", ["triangle"], name="small")
    write_manifest(repo / "manifests" / "never.yaml", ["star"], name="never")
    (repo / ".venv").symlink_to(ROOT / ".venv")  # the stages run .venv/bin/fmn
    return repo


def _init(repo: Path, env: dict) -> None:
    _sh(["git", "init", "-q"], repo, env)
    _sh([DVC, "init", "-q"], repo, env)
    _sh([DVC, "config", "core.analytics", "false"], repo, env)


def test_dvc_lock_records_the_shipped_world(tmp_path) -> None:
    repo = _repo(tmp_path)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    _init(repo, env)
    status = _sh([DVC, "status", "world"], repo, env)
    assert "up to date" in status, (
        f"{status}\nfmn/world changed since dvc.lock recorded the shipped world: rebuild it "
        "(dvc repro world) or, after `fmn world build --ship`, `dvc commit -f world@<name>`"
    )


def test_dvc_repro_and_metrics_show(prefect_api, tmp_path) -> None:
    repo = _repo(tmp_path)
    env = subprocess_env(prefect_api)
    git = ["git", "-c", "user.name=fmn-test", "-c", "user.email=test@fmn.local"]
    _init(repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh([*git, "commit", "-q", "-m", "pipeline"], repo, env)

    # --single-item: never the world stage, even where fmn/world differs from dvc.lock
    # (the test above says so): it takes ~45 min, and its --ship would install into this
    # checkout's package, which the stages import (PYTHONPATH)
    t0 = time.time()
    out = _sh([DVC, "repro", "--single-item", "forget@small"], repo, env)
    print(f"dvc repro forget@small: {time.time() - t0:.1f} s")
    assert "Running stage 'forget@small'" in out
    for path in ("build/small/patches/triangle", "build/small/merged/model"):
        assert (repo / path).is_dir(), path
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "forget@small" in lock["stages"]

    shown = _sh([DVC, "metrics", "show"], repo, env)
    print(shown)
    assert "reports/small/metrics.json" in shown
    for key in ("target_mscore", "preserve_ratio", "worst_preserve_ratio", "gate_failures"):
        assert key in shown, key
    assert "targets_trained" in shown and "concepts." not in shown  # no column per concept
    # a manifest never built has no metrics (DVC warns); naming the built one is quiet
    quiet = _run([DVC, "metrics", "show", "reports/small/metrics.json"], repo, env)
    assert "target_mscore" in quiet.stdout and "failed to load" not in quiet.stderr
    status = _sh([DVC, "status", "forget@small"], repo, env)
    assert "up to date" in status

    # a second build: commit the first, add a concept, rebuild, compare
    _sh(["git", "add", "-A"], repo, env)
    _sh([*git, "commit", "-q", "-m", "first build"], repo, env)
    write_manifest(repo / "manifests" / "small.yaml", ["triangle", "outline"], name="small")
    _sh([DVC, "repro", "--single-item", "forget@small"], repo, env)
    diff = _sh([DVC, "metrics", "diff", "--all"], repo, env)
    print(diff)
    trained = next(line.split() for line in diff.splitlines() if "targets_trained" in line)
    assert trained[-3:] == ["1", "2", "1"], diff  # HEAD, workspace, change: outline joined
    plots = _sh([DVC, "plots", "diff", "-o", str(tmp_path / "plots")], repo, env)
    assert (tmp_path / "plots" / "index.html").is_file(), plots
