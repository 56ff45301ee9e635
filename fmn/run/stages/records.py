"""What each stage returns: plain JSON (a TypedDict is a dict at run time) that the
orchestrator caches and hands to the next stage. `outputs` maps every file or folder a
stage made, relative to the run folder, to its content hash; the next stage checks those
hashes (common.check_record) before it trusts a file."""

from __future__ import annotations

from typing import NotRequired, TypedDict

Outputs = dict[str, str]  # run-relative path -> content hash


class PrepRecord(TypedDict):
    """stage_prepare: the concept's cached latents and text states."""

    concept: str
    key: str  # the prepared data's cache key
    images: int
    outputs: Outputs


class TIRecord(TypedDict):
    """stage_invert: the learned tokens (ti.safetensors)."""

    concept: str
    outputs: Outputs


class PatchRecord(TypedDict):
    """stage_resteer (and each concept of stage_resteer_group): delta.safetensors. A
    concept whose training failed in a group has `error` instead of hash and outputs."""

    concept: str
    hash: NotRequired[str]  # the patch's content hash (fmn.model.patch.patch_hash)
    outputs: NotRequired[Outputs]
    error: NotRequired[str]  # "<exception type>: <message>"
    reused: NotRequired[bool]  # kept from an earlier run of the group


class GroupRecord(TypedDict):
    """stage_resteer_group: one PatchRecord per concept, in the order asked."""

    concepts: list[PatchRecord]
    outputs: Outputs


class MergeRecord(TypedDict):
    """stage_merge: the merged patch, LoRA and model folder."""

    merged: str
    model: str
    concepts: list[str]
    patch_hash: str
    model_fingerprint: str  # fmn.model.load.fingerprint of the merged model
    outputs: Outputs


class Audited(TypedDict, total=False):
    """What stage_score audits: a model spec or folder, or a patch file (run-relative). A
    MergeRecord fits too; its outputs are checked first."""

    model: str
    patch: str
    outputs: Outputs


class ScoreRecord(TypedDict):
    """stage_score: the audit folder (M-Scores, images, summary with the gates)."""

    audit: str
    passed: bool
    outputs: Outputs


class ReportRecord(TypedDict):
    """stage_report: where the report is, and the gates' verdict."""

    report: str
    index: str
    passed: bool
    failures: list[str]
    summary: dict
