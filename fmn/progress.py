"""The one progress callback every long job reports through: the CLI draws it as rich
bars, the flows as Prefect logs, tests and benches pass their own."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(
        self, stage: str, done: int, total: int, metrics: dict[str, float] | None = None, /
    ) -> None:
        """`done` of `total` units of `stage` finished; `metrics` (loss, ...) when known."""
