"""Task: score a model against its baseline (the expensive half of an audit)."""

from __future__ import annotations

from prefect import task

from fmn.run.stages import Audited, ScoreRecord, stage_score
from tasks._common import CACHED, cache_key
from tasks.slots import device_slot


@task(
    name="score",
    cache_key_fn=cache_key("score"),
    tags=["fmn", "device"],
    **CACHED,
)
def score(
    manifest: str, run: str, audited: Audited, failed: dict[str, str] | None = None
) -> ScoreRecord:
    """fmn.run.stages.stage_score -> <run>/audit/ (rows, summary, prompts, images)."""
    with device_slot():
        return stage_score(manifest, run, audited, failed)
