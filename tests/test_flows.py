"""The forget flow end to end on the embedded world, at tiny sizes: caching across runs
(task-run states), a concept added later, a failing concept skipped, the Dask runner, a
killed `fmn run` resumed, and the run-folder lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fmn.model.patch import load_patch, patch_hash
from fmn.run.folder import run_lock
from tests.flow_helpers import (
    FMN,
    ROOT,
    copy_build,
    run_flow,
    subprocess_env,
    task_states,
    write_manifest,
)

THREE = ["carol", "triangle", "outline"]
TRAINING = ("prepare-", "invert-", "resteer-")
# the fourth concept learns tokens first (textual inversion); re-steering then suppresses them
STAR_TI = {"invert": {"enabled": True, "steps": 2, "tokens": 2}}


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    """The 3-concept build, run once (default runner). Tests only read it; one that edits
    its manifest or runs again takes its own copy (`build`)."""
    from flows.forget import forget

    folder = tmp_path_factory.mktemp("flows")
    manifest = write_manifest(folder / "tiny.yaml", THREE)
    out = folder / "run"
    t0 = time.time()
    state = forget(str(manifest), str(out), return_state=True)
    print(f"first run (3 concepts): {time.time() - t0:.1f} s")
    return SimpleNamespace(folder=folder, manifest=manifest, out=out, state=state)


@pytest.fixture
def build(first_run, tmp_path):
    """This test's own copy of the first build: it passes alone and in any order."""
    folder = copy_build(first_run.folder, tmp_path / "flows")
    return SimpleNamespace(folder=folder, manifest=folder / "tiny.yaml", out=folder / "run")


def test_first_run_builds_everything(first_run) -> None:
    out, state = first_run.out, first_run.state
    result, states = state.result(), task_states(state)
    assert result["concepts"] == dict.fromkeys(THREE, "trained")
    assert {states[f"resteer-{c}"] for c in THREE} == {"Completed"}
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert [c["id"] for c in merge["concepts"]] == THREE
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["concepts"]) == {*THREE, "alice"}
    assert (out / "report" / "index.html").is_file()
    table, markdown = _artifacts(state, ["tiny-mscore", "tiny-summary"])
    assert table.type == "table" and "carol" in str(table.data)
    assert markdown.type == "markdown" and "index.html" in markdown.data


def _artifacts(flow_state, keys: list[str]) -> list:
    """The flow run's artifacts with these keys, in that order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_key = {a.key: a for a in found}
    return [by_key[k] for k in keys]


def test_second_run_trains_nothing(build) -> None:
    result, states = run_flow(build.manifest, build.out)
    assert result["concepts"] == dict.fromkeys(THREE, "cached")
    trained = {n: s for n, s in states.items() if n.startswith(TRAINING)}
    assert len(trained) == 6 and set(trained.values()) == {"Cached"}, states
    assert result["stages"] == {"merge": "cached", "audit": "cached"}


def test_fourth_concept_trains_alone(build) -> None:
    folder, out = build.folder, build.out
    manifest = write_manifest(folder / "tiny.yaml", [*THREE, "star"], star=STAR_TI)
    result, states = run_flow(manifest, out)
    ran = sorted(n for n, s in states.items() if n.startswith(TRAINING) and s != "Cached")
    assert ran == ["invert-star", "prepare-star", "resteer-star"], states
    assert load_patch(out / "patches" / "star").method == "resteer+ti"
    assert result["concepts"] == {**dict.fromkeys(THREE, "cached"), "star": "trained"}
    assert result["stages"]["merge"] == "done"


def test_failed_concept_is_skipped_and_a_stale_entry_rebuilt(build) -> None:
    folder, out = build.folder, build.out
    # an absurd learning rate: the weights blow up, the loss turns NaN, ResteerError
    manifest = write_manifest(
        folder / "tiny.yaml", [*THREE, "dots"], dots={"resteer": {"lr": 1e30}}
    )
    # a cached result whose file vanished (a hand edit, a DVC checkout) runs again
    (out / "patches" / "triangle" / "delta.safetensors").unlink()
    result, states = run_flow(manifest, out)
    assert states["resteer-triangle"] == "Completed" and states["resteer-carol"] == "Cached"
    assert states["resteer-dots"] == "Failed"  # once: a NaN is not worth a retry
    assert "nan" in result["failed"]["dots"].lower()
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert [c["id"] for c in merge["concepts"]] == THREE
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert not summary["gates"]["passed"]
    assert any(
        f["concept"] == "dots" and f["gate"] == "trained" for f in summary["gates"]["failures"]
    )
    assert summary["concepts"]["dots"]["status"] == "failed"


def _deltas(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: load_patch(folder / "patches" / c).deltas for c in THREE}


def test_dask_runner_makes_the_same_patches(first_run, tmp_path) -> None:
    from flows.forget import forget
    from flows.runners import task_runner

    manifest = write_manifest(tmp_path / "tiny.yaml", THREE)
    dask_out = tmp_path / "dask-run"
    flow = forget.with_options(task_runner=task_runner("dask", dask_out, workers=2))
    t0 = time.time()
    result = flow(str(manifest), str(dask_out))
    print(f"dask runner, 2 workers, 3 concepts: {time.time() - t0:.1f} s")
    assert result["concepts"] == dict.fromkeys(THREE, "trained")
    assert (dask_out / "dask").is_dir()  # Dask's scratch space stays in the run folder
    ours, theirs = _deltas(first_run.out), _deltas(dask_out)
    for c in THREE:
        assert ours[c].keys() == theirs[c].keys()
        for k in ours[c]:
            torch.testing.assert_close(theirs[c][k], ours[c][k], rtol=1e-4, atol=1e-6)


def test_busy_run_folder_is_refused(prefect_api, tmp_path) -> None:
    manifest = write_manifest(tmp_path / "tiny.yaml", THREE)
    with run_lock(tmp_path / "run"):
        proc = subprocess.run(
            [*FMN, "run", str(manifest), "--out", str(tmp_path / "run")],
            env=subprocess_env(prefect_api),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "being written by another run" in proc.stderr


def test_killed_run_resumes_with_intact_files(prefect_api, tmp_path) -> None:
    from fmn.model.load import fingerprint, load_pipeline

    manifest = write_manifest(tmp_path / "tiny.yaml", THREE)
    out = tmp_path / "run"
    cmd = [*FMN, "run", str(manifest), "--out", str(out)]
    env = subprocess_env(prefect_api)
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while not list(out.glob("patches/*/delta.safetensors")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the CLI and anything it started
    proc.wait()
    assert not (out / "merged").exists(), "killed too late: the run had finished merging"

    from flows.forget import forget

    again = forget(str(manifest), str(out))  # the same build, resumed (here: in process)
    assert set(again["concepts"].values()) <= {"cached", "trained"}, again
    merge = json.loads((out / "merged" / "merge.json").read_text())
    for c in merge["concepts"]:
        assert patch_hash(out / "patches" / c["id"]) == c["hash"], c["id"]
    assert patch_hash(out / "merged") == merge["patch_hash"]
    recorded = json.loads((out / "merged.json").read_text())
    assert (
        fingerprint(load_pipeline(str(out / "merged" / "model"))) == recorded["model_fingerprint"]
    )


def test_nightly_fails_when_a_gate_fails(build) -> None:
    from flows.nightly import nightly

    # the first build's manifest: 2 re-steering steps, not forgotten
    state = nightly(str(build.manifest), out=str(build.out), return_state=True)
    assert state.is_failed() and "gates failed" in state.message, state.message


def test_prefect_yaml_deploys_the_nightly_flow() -> None:
    import inspect

    import yaml
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    (dep,) = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
    assert flow.name == "nightly"
    assert set(dep["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    assert (ROOT / dep["parameters"]["manifest"]).is_file()
    for s in dep["schedules"]:
        CronSchedule(cron=s["cron"], timezone=s["timezone"])


def test_the_manifests_attacks_run_in_the_audit_flow_and_gate_it(first_run, tmp_path) -> None:
    """evaluate.phrasing / prompt_attack switch the attacks on in a flow (as in `fmn run`),
    and recovery_max gates what they bring back."""
    import yaml

    from flows.audit import audit

    doc = yaml.safe_load(first_run.manifest.read_text())
    doc["defaults"]["invert"] = {"steps": 2}  # the prompt attack's budget: plumbing here
    doc["evaluate"] |= {
        "phrasing": True,
        "phrasings": {"carol": ["Carol"]},  # tokenised as carol: draws what the model draws
        "prompt_attack": True,
        "gates": {"recovery_max": 10.0},
    }
    manifest = tmp_path / "attacked.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "report"
    audit(str(manifest), patch=str(first_run.out / "merged"), out=str(out), run=str(tmp_path / "r"))
    summary = json.loads((out / "summary.json").read_text())
    carol = summary["concepts"]["carol"]
    assert carol["phrasing"] == "Carol"
    # the same images, drawn in another batch: equal up to float noise
    assert carol["phrasing_mscore"] == pytest.approx(carol["mscore"], abs=1e-5)
    assert len(carol["prompt_attack"]["words"].split()) == 3
    assert summary["evaluate"]["prompt_attack"] and "prompt_asr" in summary["targets"]
    assert summary["gates"]["recovery_max"] == 10.0


def test_audit_flow_reports_on_a_patch(first_run, tmp_path) -> None:
    from flows.audit import audit

    out = tmp_path / "audit-report"
    rec = audit(
        str(first_run.manifest),
        patch=str(first_run.out / "merged"),
        out=str(out),
        run=str(tmp_path / "audit-run"),
    )
    summary = json.loads((out / "summary.json").read_text())
    assert rec["index"] == str(out / "index.html") and "patch" in summary["models"]["patched"]
