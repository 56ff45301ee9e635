"""Detectors: the probability that a concept is present in an image.

One small interface, so the M-Score does not care which model measures. `world` is the
embedded classifier; face/clip/nudenet detectors plug in behind the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fmn.world.classifier import load_classifier
from fmn.world.concepts import HEADS, TYPE_TO_HEAD


class Detector(Protocol):
    name: str

    def score(
        self, images: np.ndarray, concept_id: str, concept_type: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [N, H, W, 3] -> (probability the concept is present [N],
        recognised [N] bool: the concept is the detector's top-1 answer)."""


class WorldDetector:
    """The embedded world's classifier: one softmax head per category."""

    name = "world"

    def __init__(self, classifier_dir: Path) -> None:
        self.clf = load_classifier(classifier_dir)

    def head_probs(self, images: np.ndarray, head: str) -> np.ndarray:
        """[N, K] probabilities over the head's concepts (a 'none' class absorbs the rest)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="area" if x.shape[-1] > 32 else "bilinear")
        return torch.cat([self.clf.probs(chunk)[head] for chunk in x.split(256)]).numpy()

    def _lookup(self, concept_id: str, concept_type: str) -> tuple[str, int]:
        head = TYPE_TO_HEAD.get(concept_type)
        if head is None or concept_id not in HEADS[head]:
            raise KeyError(
                f"the world detector knows no {concept_type} concept {concept_id!r}; "
                "use another detector for concepts outside the embedded world"
            )
        return head, HEADS[head].index(concept_id)

    def score(
        self, images: np.ndarray, concept_id: str, concept_type: str
    ) -> tuple[np.ndarray, np.ndarray]:
        head, k = self._lookup(concept_id, concept_type)
        p = self.head_probs(images, head)
        # top-1 among the head's concepts, and more likely than 'none' (1 - sum)
        return p[:, k], (p.argmax(1) == k) & (p[:, k] > 1 - p.sum(1))
