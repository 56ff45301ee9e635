"""The nightly build (prefect.yaml schedules it): the forget flow on the nightly manifest,
failing the run when a gate fails, so the schedule shows red and alerts can fire."""

from __future__ import annotations

from prefect import flow

from flows.forget import forget


class GatesFailedError(RuntimeError):
    """The merged model did not pass the manifest's gates."""


@flow(name="nightly")
def nightly(
    manifest: str = "manifests/nightly.yaml", out: str | None = None, report: str | None = None
) -> dict:
    """Build the safety patch from `manifest`; fail when a target is still generated or a
    preserved concept was damaged (the report says which)."""
    result = forget(manifest, out=out, report=report)
    if not result["passed"]:
        failures = "\n".join(f"  - {f}" for f in result["failures"])
        raise GatesFailedError(f"gates failed; report: {result['index']}\n{failures}")
    return result
