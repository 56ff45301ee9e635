"""What every task shares: its cache key, which results it may retry, where its results
live, and the device slot. This is the only layer that knows Prefect's caching.

Cache: a task's key hashes `fmn.run.stages.stage_inputs` (the concept's resolved spec, input
file hashes, the base model's files, the code of the fmn modules behind the stage) and the
task's own source. Results are JSON records of paths and hashes, persisted inside the run
folder (`<run>/.prefect/results`, so a run folder carries its own cache). A cached record
whose files were deleted or changed since (a DVC checkout, a hand edit) is dropped when
the key is computed, so the stage runs again instead of handing on a dangling path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect.context import TaskRunContext

from fmn.code_key import source_key
from fmn.run.folder import RunPaths, canonical_hash, intact
from fmn.run.stages import stage_key

# Worth another try: I/O and network hiccups, a GPU whose memory another job held for a
# moment. Not worth it: anything the inputs decide (a NaN loss, a bad manifest, a missing
# file), which would fail the same way again.
TRANSIENT = (OSError, ConnectionError, TimeoutError, torch.cuda.OutOfMemoryError)
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
RETRIES = 2


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry only errors that can pass by themselves."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # the result itself could not be read back
            exc = e
    return isinstance(exc, TRANSIENT) and not isinstance(exc, PERMANENT)


def cache_key(stage: str):
    """cache_key_fn for a stage's task (see the module docstring)."""

    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        # the task's own module, read from its file: in a Dask worker the function itself
        # may arrive by value, without source that inspect could find (the fmn code
        # behind the stage is in stage_key)
        code = source_key([ctx.task.fn.__module__, __name__])
        k = f"fmn-{stage}-{canonical_hash([stage_key(stage, params), code])[:40]}"
        _drop_if_stale(ctx, k, Path(params["run"]))
        return k

    return key


def _drop_if_stale(ctx: TaskRunContext, key: str, run: Path) -> None:
    store = ctx.result_store
    try:
        if not store.exists(key):
            return
        record = store.read(key).result
        outputs = record.get("outputs") if isinstance(record, dict) else None
    except Exception:  # an unreadable record is as good as none
        outputs = None
    if outputs is None or not intact(run, outputs):
        (RunPaths(run).results / key).unlink(missing_ok=True)


# Options of every cached stage task. JSON, not pickle: a record is plain data, and a
# cache folder must never run code when it is read.
CACHED: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",
    "retries": RETRIES,
    "retry_delay_seconds": [10, 60],
    "retry_condition_fn": is_transient,
}
