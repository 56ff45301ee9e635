"""Task: attention re-steering of one concept -> its patch."""

from __future__ import annotations

from prefect import task

from fmn.run.stages import PatchRecord, PrepRecord, TIRecord, stage_resteer
from tasks._common import CACHED, cache_key
from tasks.slots import device_slot


@task(
    name="resteer",
    task_run_name="resteer-{concept_id}",
    cache_key_fn=cache_key("resteer"),
    tags=["fmn", "device", "training"],
    **CACHED,
)
def resteer(
    manifest: str, concept_id: str, run: str, prep: PrepRecord, ti: TIRecord | None = None
) -> PatchRecord:
    """fmn.run.stages.stage_resteer -> patches/<id>/delta.safetensors. A NaN loss fails the
    concept at once (no retry: it would diverge again)."""
    with device_slot():
        return stage_resteer(manifest, concept_id, run, prep, ti)
