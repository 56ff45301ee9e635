"""The build's stages, path in and path out; the Prefect tasks in tasks/ wrap one each.

Every stage reads the manifest and its inputs from files, runs one piece of fmn, writes
its outputs atomically into the run folder (fmn.run.folder) and returns a plain, JSON-able
record: what it made, as paths relative to the run folder with their content hashes
(`outputs`). The next stage takes that record and checks the hashes before it trusts a
file. `stage_inputs` says what each stage's result depends on (the concept's resolved
spec, input file hashes, the base model's files, the stage's code), so an orchestrator
can key a cache on it. Nothing here imports Prefect.
"""

from fmn.run.stages.audit import mark_failed, stage_report, stage_score
from fmn.run.stages.common import (
    StageInputError,
    base_spec,
    model_key,
    stage_inputs,
    stage_key,
)
from fmn.run.stages.concept import stage_invert, stage_prepare, stage_resteer
from fmn.run.stages.group import stage_resteer_group
from fmn.run.stages.merge import stage_merge
from fmn.run.stages.records import (
    Audited,
    GroupRecord,
    MergeRecord,
    PatchRecord,
    PrepRecord,
    ReportRecord,
    ScoreRecord,
    TIRecord,
)

__all__ = [
    "Audited",
    "GroupRecord",
    "MergeRecord",
    "PatchRecord",
    "PrepRecord",
    "ReportRecord",
    "ScoreRecord",
    "StageInputError",
    "TIRecord",
    "base_spec",
    "mark_failed",
    "model_key",
    "stage_inputs",
    "stage_invert",
    "stage_key",
    "stage_merge",
    "stage_prepare",
    "stage_report",
    "stage_resteer",
    "stage_resteer_group",
    "stage_score",
]
