"""Detectors: the probability that a concept is present in an image.

One small interface, so the M-Score does not care which model measures:

| name | measures | weights |
|---|---|---|
| `world` | the embedded world's concepts | the world's classifier (ships in the package) |
| `face` | identities, against reference photos | InceptionResnetV1 from a local path |
| `clip` | any concept, zero-shot over the manifest's texts | a local CLIP folder |
| `nudenet` | nudity | NudeNet's 320n ONNX model (ships in its wheel) |

`make_detectors` picks one per concept type from the manifest's `evaluate.detectors`.
Every detector accepts an empty batch, which checks that it knows the concept: an audit
calls that first, so a bad concept fails before any image is generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fmn.eval.mscore.base import Detector, DetectorError
from fmn.world.classifier import load_classifier
from fmn.world.concepts import TYPE_TO_HEAD

if TYPE_CHECKING:
    from fmn.manifest import Manifest

__all__ = ["DETECTORS", "Detector", "DetectorError", "WorldDetector", "make_detectors"]

DETECTORS = ("world", "face", "clip", "nudenet")


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
        names = self.clf.names.get(head, []) if head else []
        if concept_id not in names:
            raise DetectorError(
                f"the world detector knows no {concept_type} concept {concept_id!r}; "
                "use another detector for concepts outside the embedded world"
            )
        return head, names.index(concept_id)

    def score(
        self, images: np.ndarray, concept_id: str, concept_type: str
    ) -> tuple[np.ndarray, np.ndarray]:
        head, k = self._lookup(concept_id, concept_type)
        if len(images) == 0:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        p = self.head_probs(images, head)
        # top-1 among the head's concepts, and more likely than 'none' (1 - sum)
        return p[:, k], (p.argmax(1) == k) & (p[:, k] > 1 - p.sum(1))


def manifest_concepts(manifest: Manifest) -> list[tuple[str, str, str]]:
    """(id, type, text) of every target and preserved concept, in manifest order."""
    return [(c.id, c.type, c.text) for c in [*manifest.concepts, *manifest.preserve]]


def _local(manifest: Manifest, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (manifest.base_dir / path).resolve()


def face_references(manifest: Manifest) -> dict[str, Path]:
    """Reference folders for the face detector: `evaluate.references`, else a target's own
    images folder (its training photos are the best picture of who it is)."""
    refs = {c.id: c.images for c in manifest.concepts if isinstance(c.images, Path)}
    refs |= manifest.evaluate.references
    return {cid: _local(manifest, folder) for cid, folder in refs.items()}


def world_classifier_for(base_model: str) -> Path:
    """The classifier of the embedded world a manifest is built on. The world detector
    measures only those worlds: on any other model a concept that happens to share a
    world name ("star", "dots") would be scored by a 32 px cartoon classifier."""
    from fmn.model.load import embedded_path
    from fmn.world.concepts import WORLDS

    name = str(base_model).removeprefix("embedded:")
    if not str(base_model).startswith("embedded:") or name not in WORLDS:
        raise DetectorError(
            f"the world detector measures only the embedded worlds, and base_model is "
            f"{base_model!r}: set evaluate.detectors to clip, face or nudenet for this "
            "model (with their weights), or pass a world classifier folder explicitly"
        )
    return embedded_path(name) / "classifier"


def make_detector(name: str, manifest: Manifest, *, world_classifier: Path | None = None):
    """The detector `name` configured from the manifest (weights paths, concept texts,
    reference images); `world_classifier` defaults to the classifier of the embedded
    world the manifest's base_model names (any other base model is refused)."""
    ev = manifest.evaluate
    if name == "world":
        return WorldDetector(world_classifier or world_classifier_for(manifest.base_model))
    if name == "face":
        from fmn.eval.mscore.face import FaceDetector

        if ev.face_weights is None:
            raise DetectorError("the face detector needs evaluate.face_weights (a local path)")
        return FaceDetector(_local(manifest, ev.face_weights), face_references(manifest))
    if name == "clip":
        from fmn.eval.mscore.clip import ClipDetector

        if ev.clip_model is None:
            raise DetectorError("the clip detector needs evaluate.clip_model (a local folder)")
        return ClipDetector(_local(manifest, ev.clip_model), manifest_concepts(manifest))
    if name == "nudenet":
        from fmn.eval.mscore.nudenet import NudeNetDetector

        return NudeNetDetector()
    raise DetectorError(f"unknown detector {name!r}; one of {', '.join(DETECTORS)}")


def make_detectors(
    manifest: Manifest, types: Sequence[str], *, world_classifier: Path | None = None
) -> dict[str, Detector]:
    """One detector per concept type in `types`, as `evaluate.detectors` says; a detector
    chosen for several types is built once."""
    chosen = manifest.evaluate.detectors.model_dump()
    built: dict[str, Detector] = {}
    for name in dict.fromkeys(chosen[t] for t in types):
        built[name] = make_detector(name, manifest, world_classifier=world_classifier)
    return {t: built[chosen[t]] for t in types}
