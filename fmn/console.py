"""The CLI's console and its progress view, shared by every command (`fmn.cli`) and by the
run view (`fmn.cli_run`), so neither imports the other."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()


def progress_columns(out: Console | None = None) -> Progress:
    """The progress view of every command: stage, bar, n/total, metrics, time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=out or console,
    )
