"""Task: several concepts re-steered in one batched pass -> a patch each."""

from __future__ import annotations

from prefect import task

from fmn.run.stages import GroupRecord, PrepRecord, stage_resteer_group
from tasks._common import CACHED, cache_key
from tasks.slots import device_slot


@task(
    name="resteer_group",
    task_run_name="resteer-{concept_ids}",
    cache_key_fn=cache_key("resteer_group"),
    tags=["fmn", "device", "training"],
    **CACHED,
)
def resteer_group(
    manifest: str, concept_ids: list[str], run: str, preps: list[PrepRecord], tis: list
) -> GroupRecord:
    """fmn.run.stages.stage_resteer_group -> patches/<id>/delta.safetensors for each concept.
    A concept whose loss turns NaN comes back as an error record; the others still land."""
    with device_slot():
        return stage_resteer_group(manifest, concept_ids, run, preps, tis)
