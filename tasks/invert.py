"""Task: textual inversion of one concept (only when the manifest enables it)."""

from __future__ import annotations

from prefect import task

from fmn.run.stages import PrepRecord, TIRecord, stage_invert
from tasks._common import CACHED, cache_key
from tasks.slots import device_slot


@task(
    name="invert",
    task_run_name="invert-{concept_id}",
    cache_key_fn=cache_key("invert"),
    tags=["fmn", "device", "training"],
    **CACHED,
)
def invert(manifest: str, concept_id: str, run: str, prep: PrepRecord) -> TIRecord:
    """fmn.run.stages.stage_invert -> ti.safetensors."""
    with device_slot():
        return stage_invert(manifest, concept_id, run, prep)
