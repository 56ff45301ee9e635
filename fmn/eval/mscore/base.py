"""The interface every detector implements, and its error: the face, clip and nudenet
detectors import it from here, the factory (`detectors.py`) imports them."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class DetectorError(ValueError):
    """A detector that cannot be built or cannot measure a concept; says what to pass."""


class Detector(Protocol):
    name: str

    def score(
        self, images: np.ndarray, concept_id: str, concept_type: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [N, H, W, 3] -> (probability the concept is present [N],
        recognised [N] bool: the concept is the detector's top-1 answer)."""
