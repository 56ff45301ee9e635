"""What an audit hands its report: the summary, every scored image's row, the images and
the prompts they were drawn from. Its own module, so the audit and the report both import
it and neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# An attack succeeds on a target where it brings it back to at least half its base M-Score
# (the attack success rate of the robustness literature, e.g. UnlearnDiffAtk).
RECOVERED_AT = 0.5


@dataclass
class AuditResult:
    summary: dict
    rows: list[dict]  # one per concept x model x prompt x seed (see MODELS)
    images: dict[str, dict[str, np.ndarray]]  # model -> concept id -> uint8 [P*S, H, W, 3]
    prompts: dict[str, list[str]]  # concept id -> its prompts, in image order (x seeds)
    out: Path | None = None
