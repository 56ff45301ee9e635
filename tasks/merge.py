"""Task: merge the concepts' patches into one model."""

from __future__ import annotations

from prefect import task

from fmn.run.stages import MergeRecord, PatchRecord, stage_merge
from tasks._common import CACHED, cache_key
from tasks.slots import device_slot


@task(
    name="merge",
    cache_key_fn=cache_key("merge"),
    tags=["fmn", "device"],
    **CACHED,
)
def merge(manifest: str, run: str, patches: list[PatchRecord]) -> MergeRecord:
    """fmn.run.stages.stage_merge -> merged/ (patch, LoRA, diffusers model, merge.json)."""
    with device_slot():
        return stage_merge(manifest, run, patches)
