"""`fmn run MANIFEST`: the forget flow behind a console view (part of the CLI face: it is
the one place in fmn/ that starts a Prefect flow, imported only when `fmn run` runs).

The view follows the run folder's progress files (fmn.run.folder.ProgressFile), one row per
concept plus merge and audit, so it shows the same whether the stages run in threads or
in Dask workers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fmn.console import progress_columns
from fmn.run.folder import RunPaths, default_paths, read_progress


def _quiet_defaults() -> None:
    # before Prefect is imported: it reads its settings once
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the view shows progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _View:
    """Rows of a rich Progress, refreshed from the progress files by a thread."""

    def __init__(
        self, console: Console, run: RunPaths, keys: list[str], first: dict[str, str]
    ) -> None:
        """keys: one row each; first: a row's first words where not "waiting"."""
        self.run, self.stop = run, threading.Event()
        self.bar = progress_columns(console)
        self.rows = {
            k: self.bar.add_task(f"{k:<14} {first.get(k, 'waiting')}", total=1, info="")
            for k in keys
        }

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        for key, p in read_progress(self.run).items():
            if key in self.rows:
                info = " ".join(f"{k}={v:.4f}" for k, v in p["metrics"].items())
                self.bar.update(
                    self.rows[key],
                    description=f"{key:<14} {p['stage']}",
                    completed=p["done"],
                    total=max(p["total"], 1),
                    info=info,
                )

    def finish(self, status: dict[str, str]) -> None:
        self.refresh()
        for key, row in self.rows.items():
            if key in status:
                self.bar.update(row, description=f"{key:<14} {status[key]}", completed=1, total=1)

    def __enter__(self) -> _View:
        self.bar.__enter__()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.__exit__(*exc)


def _print_result(console: Console, result: dict, seconds: float) -> None:
    from fmn.eval.result import correction_lines
    from tasks.report import mscore_table

    summary = json.loads((Path(result["report"]) / "summary.json").read_text())
    rows = mscore_table(summary)
    table = Table(*rows[0].keys(), title=f"{result['name']}: M-Scores")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for line in correction_lines(summary):
        console.print(line)
    for f in result["failures"]:
        console.print(f"[red]gate failed:[/red] {f}")
    states = list(result["concepts"].values())
    trained, gated, cached = (states.count(s) for s in ("trained", "gated", "cached"))
    console.print(
        f"{trained} concept(s) trained, {gated} gated, {cached} cached, "
        f"{len(result['failed'])} failed; "
        f"{seconds:.0f} s. Merged model: {Path(result['run']) / result['merged']['model']}"
    )
    console.print(f"Report: {result['index']}")


def run_manifest(
    manifest: Path,
    *,
    runner: str = "default",
    workers: int = 2,
    address: str | None = None,
    out: Path | None = None,
    report: Path | None = None,
    threads: int = 1,
    fail_on_gates: bool = True,
    console: Console | None = None,
) -> int:
    """Run the forget flow on a manifest; returns the exit code: 0 built and the gates
    passed (or fail_on_gates is off), 1 the build failed or a gate failed, 2 bad input or
    the run folder is busy."""
    _quiet_defaults()
    from fmn.manifest import ManifestError, load_manifest
    from fmn.run.folder import RunLockedError, run_lock, sweep_stale_temp

    console = console or Console()
    try:
        m = load_manifest(manifest)
    except ManifestError as e:
        print(e, file=sys.stderr)  # plain lines: one problem each, easy to grep
        return 2
    from flows.runners import RUNNERS

    if runner not in RUNNERS or (address and runner == "default"):
        print(f"run: --runner must be one of {RUNNERS} (--address needs dask)", file=sys.stderr)
        return 2
    run_dir, report_dir = default_paths(m.name, out, report)
    t0 = time.time()
    try:
        with run_lock(run_dir):  # before the heavy imports: a busy folder is refused at once
            import torch

            from flows.forget import forget
            from flows.runners import task_runner
            from tasks.slots import ensure_device_slot

            torch.set_num_threads(max(1, threads))
            rp = RunPaths(run_dir)
            shutil.rmtree(rp.progress, ignore_errors=True)  # the last run's rows
            # a killed run leaves its half-written temp files; nobody else writes here now
            sweep_stale_temp(run_dir)
            sweep_stale_temp(report_dir.parent, prefix=f".{report_dir.name}.")
            ensure_device_slot()
            flow = forget.with_options(task_runner=task_runner(runner, run_dir, workers, address))
            keys = [c.id for c in m.concepts] + ["merge", "audit"]
            gated = {
                c.id: "gated in the merge" for c in m.concepts if m.resolve(c.id).erase == "gate"
            }
            with _View(console, rp, keys, gated) as view:
                state = flow(str(manifest), str(run_dir), str(report_dir), return_state=True)
                result = state.result(raise_on_failure=False)
                done = result if isinstance(result, dict) else {}
                view.finish({**done.get("concepts", {}), **done.get("stages", {})})
    except RunLockedError as e:
        print(f"run: {e}", file=sys.stderr)
        return 2
    if isinstance(result, BaseException):
        console.print(f"[red]run failed:[/red] {type(result).__name__}: {result}")
        console.print(f"Finished stages are kept in {run_dir}; running again resumes.")
        return 1
    _print_result(console, result, time.time() - t0)
    return 0 if result["passed"] or not fail_on_gates else 1
