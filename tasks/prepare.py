"""Task: prepare one concept (images, masks, latents, text conditioning)."""

from __future__ import annotations

from prefect import task

from fmn.run.stages import PrepRecord, stage_prepare
from tasks._common import CACHED, cache_key
from tasks.slots import device_slot


@task(
    name="prepare",
    task_run_name="prepare-{concept_id}",
    cache_key_fn=cache_key("prepare"),
    tags=["fmn", "device"],
    **CACHED,
)
def prepare(manifest: str, concept_id: str, run: str) -> PrepRecord:
    """fmn.run.stages.stage_prepare: generates images with the base model, so it holds the
    device slot."""
    with device_slot():
        return stage_prepare(manifest, concept_id, run)
