"""The DVC pipeline in a temporary git repository: `dvc repro` of a forget stage on a small
manifest runs `fmn run`, `dvc metrics show` prints the build's summary, and after a second
build (one more concept) `dvc metrics diff` and `dvc plots diff` compare the two."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import yaml

from tests.flow_helpers import ROOT, subprocess_env, write_manifest

DVC = str(ROOT / ".venv" / "bin" / "dvc")


def _sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _repo(tmp: Path) -> Path:
    """The project's pipeline files and the code its stages depend on, in a new repo."""
    repo = tmp / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("fmn", "tasks", "flows", "data"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    for name in ("dvc.yaml", "dvc.lock", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["manifests"] = ["small"]  # one forget stage: forget@small
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "manifests").mkdir()
    write_manifest(repo / "manifests" / "small.yaml", ["triangle"], name="small")
    (repo / ".venv").symlink_to(ROOT / ".venv")  # the stages run .venv/bin/fmn
    return repo


def test_dvc_repro_and_metrics_show(prefect_api, tmp_path) -> None:
    repo = _repo(tmp_path)
    env = subprocess_env(prefect_api)
    git = ["git", "-c", "user.name=fmn-test", "-c", "user.email=test@fmn.local"]
    _sh(["git", "init", "-q"], repo, env)
    _sh([DVC, "init", "-q"], repo, env)
    _sh([DVC, "config", "core.analytics", "false"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh([*git, "commit", "-q", "-m", "pipeline"], repo, env)

    t0 = time.time()
    out = _sh([DVC, "repro", "forget@small"], repo, env)
    print(f"dvc repro forget@small: {time.time() - t0:.1f} s")
    assert "Running stage 'forget@small'" in out
    assert "Stage 'world' didn't change" in out  # dvc.lock records the shipped world
    for path in ("build/small/patches/triangle", "build/small/merged/model"):
        assert (repo / path).is_dir(), path
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "forget@small" in lock["stages"]

    shown = _sh([DVC, "metrics", "show"], repo, env)
    print(shown)
    assert "reports/small/summary.json" in shown
    assert "targets.mscore" in shown and "gates.passed" in shown
    status = _sh([DVC, "status", "forget@small"], repo, env)
    assert "up to date" in status

    # a second build: commit the first, add a concept, rebuild, compare
    _sh(["git", "add", "-A"], repo, env)
    _sh([*git, "commit", "-q", "-m", "first build"], repo, env)
    write_manifest(repo / "manifests" / "small.yaml", ["triangle", "outline"], name="small")
    _sh([DVC, "repro", "forget@small"], repo, env)
    diff = _sh([DVC, "metrics", "diff", "--all"], repo, env)
    print(diff)
    assert "concepts.outline.mscore" in diff, diff  # the new concept's metrics appear
    plots = _sh([DVC, "plots", "diff", "-o", str(tmp_path / "plots")], repo, env)
    assert (tmp_path / "plots" / "index.html").is_file(), plots
