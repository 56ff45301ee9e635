"""Shared by the flow and DVC tests: a Prefect API for the session (prefect_test_harness
with its own PREFECT_HOME), tiny world manifests, and a look at task-run states."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FMN = [sys.executable, "-m", "fmn.cli"]
# tiny but real: 2 generated images, 2 re-steering steps, 1 prompt x 1 seed x 2 DDIM steps;
# no closed loop, which judges every rung with generated images (tens of seconds a
# concept): test_loop.py covers it, through the library and through `fmn run`. Every
# concept is re-steered, carol too (identities, objects and styles are gated by default:
# test_eraser.py runs that path through the flow)
TINY = {
    "defaults": {"resteer": {"steps": 2, "mask": "none", "loop": False}, "erase": "resteer"},
    "preserve": [{"id": "alice", "type": "id"}],
    "evaluate": {"prompts_per_concept": 1, "seeds": [0], "steps": 2},
    "on_error": "skip",
}
WORLD = {"carol": "id", "triangle": "object", "outline": "style", "star": "object", "dots": "style"}


def write_manifest(path: Path, ids: list[str], name: str = "tiny", **overrides) -> Path:
    """A manifest of world concepts; overrides: {concept id: {key: value}} or top-level."""
    concepts = [
        {"id": c, "type": WORLD[c], "images": {"generate": 2}, **overrides.pop(c, {})} for c in ids
    ]
    doc = {"name": name, "base_model": "embedded:tiny-world", **TINY, **overrides}
    path.write_text(yaml.safe_dump({**doc, "concepts": concepts}, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A temporary Prefect API server and database; yields its URL. Stages take a named
    device slot (FMN_DEVICE_SLOT), as on a GPU machine, so the slot path runs too."""
    env = {
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "FMN_DEVICE_SLOT": "fmn-test",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from tasks.slots import ensure_device_slot

    try:
        with prefect_test_harness(server_startup_timeout=120):
            ensure_device_slot(1)
            yield PREFECT_API_URL.value()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def subprocess_env(api_url: str) -> dict[str, str]:
    """Environment of an `fmn` subprocess that uses the test API. No device slot: a
    process killed mid-run would keep its slot (the test server frees no leases)."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "FMN_DEVICE_SLOT": ""}
    env["PYTHONPATH"] = str(ROOT)
    return env


def copy_build(folder: Path, dest: Path) -> Path:
    """A test's own copy of a module's build (manifest, run folder, its Prefect cache), so
    a test that edits or re-runs it never changes what another test sees, whatever the
    order. Cache keys hash contents, never paths, and records hold paths relative to the
    run folder, so the copy reuses every cached stage."""
    import shutil

    shutil.copytree(folder, dest, symlinks=True)
    return dest


def run_flow(manifest: Path, out: Path) -> tuple[dict, dict[str, str]]:
    """Run the forget flow; its result and its task runs' states."""
    import time

    from flows.forget import forget

    t0 = time.time()
    state = forget(str(manifest), str(out), return_state=True)
    result = state.result()
    print(f"{manifest.name}: {time.time() - t0:.1f} s, {result['concepts']}")
    return result, task_states(state)


def task_states(flow_state) -> dict[str, str]:
    """Task-run name -> state name ('Completed', 'Cached', 'Failed', ...) of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}
