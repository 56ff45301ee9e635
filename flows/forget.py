"""The forget flow: manifest -> per re-steered concept (prepare -> invert? -> resteer) ->
merge (which also fits the gated concepts' gates) -> score (baseline vs merged) -> report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.futures import PrefectFuture

import tasks
from fmn.manifest import load_manifest
from fmn.run.folder import default_paths, run_lock
from tasks.slots import ensure_device_slot


class ConceptsFailedError(RuntimeError):
    """Concepts failed to train and the manifest says on_error: fail (or all failed)."""


def _why(futures: list[PrefectFuture]) -> str:
    """The first error in a concept's chain (later tasks never ran)."""
    for f in futures:
        if f.state.is_failed() or f.state.is_crashed():
            exc = f.state.result(raise_on_failure=False)
            if isinstance(exc, BaseException):
                return f"{type(exc).__name__}: {exc}"
            return f.state.message or f.state.name
    return futures[-1].state.message or futures[-1].state.name


def _done(future: PrefectFuture, ran: str = "done") -> str:
    return "cached" if future.state.name == "Cached" else ran


def _settle(chains: dict[str, list[PrefectFuture]], on_error: str, gated: int = 0):
    """Wait for every concept; split the finished patches from the failed concepts.
    gated: how many concepts the merge erases by their gates (never failed here)."""
    patches, failed, status = [], {}, {}
    for futures in chains.values():
        futures[-1].wait()
    for cid, futures in chains.items():
        last = futures[-1]
        if not last.state.is_completed():
            failed[cid], status[cid] = _why(futures), "failed"
            continue
        record, ran = last.result(), "trained"
        if "concepts" in record:  # a group's record: this concept's part of it
            record = next(r for r in record["concepts"] if r["concept"] == cid)
            if "error" in record:
                failed[cid], status[cid] = record["error"], "failed"
                continue
            ran = "cached" if record.pop("reused", False) else ran
        patches.append(record)
        status[cid] = _done(last, ran)
    if failed and on_error == "fail":
        lines = "; ".join(f"{c}: {why}" for c, why in failed.items())
        raise ConceptsFailedError(f"{len(failed)} concept(s) failed (on_error: fail): {lines}")
    if not patches and chains and not gated:
        raise ConceptsFailedError(f"every concept failed: {failed}")
    return patches, failed, status


def _groups(t, manifest: str, run: str, ids: list[str], chains: dict, size: int) -> None:
    """Re-steer `ids` in groups of `size` once their inputs are ready; a concept whose
    preparation or inversion failed stays out (its chain already ends in the failure)."""
    for cid in ids:
        chains[cid][-1].wait()
    ready = [cid for cid in ids if chains[cid][-1].state.is_completed()]
    for i in range(0, len(ready), size):
        group = ready[i : i + size]
        preps = [chains[cid][0] for cid in group]
        tis = [chains[cid][1] if len(chains[cid]) > 1 else None for cid in group]
        future = t.resteer_group.submit(manifest, group, run, preps, tis)
        for cid in group:
            chains[cid].append(future)


@flow(name="forget")
def forget(manifest: str, out: str | None = None, report: str | None = None) -> dict:
    """Forget a manifest's concepts, merge them, audit the merged model and write the
    report. Re-runs reuse every result whose inputs did not change (tasks/_common.py)."""
    m = load_manifest(manifest)
    manifest = str(Path(manifest).resolve())
    run_dir, report_dir = default_paths(m.name, out, report)
    run = str(run_dir)
    with run_lock(run_dir):
        ensure_device_slot()
        t = tasks.for_run(run)
        chains: dict[str, list[PrefectFuture]] = {}
        if m.merge.method != "joint":  # joint re-steers every concept in the merge task
            together = []  # concepts for shared re-steering passes (defaults.train_together)
            for c in m.concepts:
                r = m.resolve(c.id)
                if r.erase == "gate":  # no images or patch of its own: the merge fits its gate
                    continue
                prep = t.prepare.submit(manifest, c.id, run)
                ti = t.invert.submit(manifest, c.id, run, prep) if r.invert.enabled else None
                chains[c.id] = [f for f in (prep, ti) if f is not None]
                shared = r.resteer.params == "to_kv" and r.action == "forget"
                if m.defaults.train_together > 1 and shared:
                    together.append(c.id)
                else:
                    chains[c.id].append(t.resteer.submit(manifest, c.id, run, prep, ti))
            _groups(t, manifest, run, together, chains, m.defaults.train_together)
        gated = sum(m.resolve(c.id).erase == "gate" for c in m.concepts)
        patches, failed, status = _settle(chains, m.on_error, gated)
        merge_run = t.merge.submit(manifest, run, patches)
        merged = merge_run.result()
        for c in m.concepts:  # joint, or gated: done in the merge task
            if c.id not in chains:
                status[c.id] = _done(merge_run, "trained" if m.merge.method == "joint" else "gated")
        score_run = t.score.submit(manifest, run, merged, failed)
        scored = score_run.result()
        rep = t.report.submit(run, scored, str(report_dir)).result()
        stages = {"merge": _done(merge_run), "audit": _done(score_run)}
    return {
        "name": m.name,
        "run": run,
        "report": rep["report"],
        "index": rep["index"],
        "passed": rep["passed"],
        "failures": rep["failures"],
        "concepts": status,
        "stages": stages,
        "failed": failed,
        "merged": merged,
    }
