"""The `face` detector: MTCNN finds the faces, InceptionResnetV1 embeds them, and cosine
similarity to the concept's reference faces says whether it is that person.

The embedding net's weights come from a local file (facenet-pytorch's `pretrained=`
downloads them, which is not possible here): a .safetensors state dict, or the published
.pt file, read with `torch.load(weights_only=True)`, which rebuilds tensors only and runs
no pickled code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fmn.data.masks import Face, detect_faces
from fmn.eval.mscore.base import DetectorError
from fmn.manifest import image_files

FACE_SIDE = 160  # InceptionResnetV1's input side, as facenet-pytorch's MTCNN crops it
FACE_MARGIN = 0.1  # context around the box (facenet crops with a few pixels of margin)
# Cosine similarity at which the probability is 0.5. FaceNet's usual verification
# threshold is an L2 distance of ~1.1 between unit embeddings, i.e. cos = 1 - 1.1^2/2 ~ 0.4.
MATCH_COS = 0.4
MATCH_WIDTH = 0.05  # cos 0.3 -> p 0.12, cos 0.5 -> p 0.88: a soft version of that threshold
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def load_face_net(path: Path) -> torch.nn.Module:
    """InceptionResnetV1 (embedding mode) with the state dict at `path`, in eval mode."""
    from facenet_pytorch import InceptionResnetV1

    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"face weights not found: {path} (evaluate.face_weights)")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix.lower() in (".pt", ".pth"):
        # weights_only: the restricted unpickler builds tensors and plain containers only
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise DetectorError(f"face weights must be one of {WEIGHT_SUFFIXES}, got {path}")
    # the published files carry a classifier over the training identities; embeddings
    # come from the layer before it
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    net = InceptionResnetV1(pretrained=None, classify=False)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise DetectorError(f"{path} is not an InceptionResnetV1 state dict: {e}") from None
    return net.eval()


def _crop(image: Image.Image, face: Face) -> torch.Tensor:
    """[3, 160, 160] face crop, standardised as facenet's models were trained."""
    x1, y1, x2, y2 = face.box
    m = FACE_MARGIN * max(x2 - x1, y2 - y1)
    box = (x1 - m, y1 - m, x2 + m, y2 + m)
    crop = image.crop(tuple(round(v) for v in box)).resize(
        (FACE_SIDE, FACE_SIDE), Image.Resampling.BILINEAR
    )
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)
    return (x - 127.5) / 128.0


class FaceDetector:
    """Identities by face: probability from the best-matching face's cosine similarity to
    the concept's reference embedding; recognised when it matches (cos > MATCH_COS) and the
    concept is the closest of all the concepts with references."""

    name = "face"

    def __init__(self, weights: Path, references: Mapping[str, Path]) -> None:
        self.net = load_face_net(weights)
        self.references = dict(references)
        self._centroids: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Per image, [k, 512] unit embeddings of the k faces MTCNN finds (k may be 0)."""
        crops, counts = [], []
        for image in images:
            faces = detect_faces(image)
            crops += [_crop(image, f) for f in faces]
            counts.append(len(faces))
        if not crops:
            return [torch.zeros(0, 512) for _ in images]
        emb = torch.cat([self.net(c) for c in torch.stack(crops).split(32)])
        return list(emb.split(counts))

    def centroid(self, concept_id: str) -> torch.Tensor:
        """Unit mean embedding of the largest face in each reference image."""
        if concept_id in self._centroids:
            return self._centroids[concept_id]
        folder = self.references.get(concept_id)
        if folder is None:
            raise DetectorError(
                f"the face detector has no reference images of {concept_id!r}; give its "
                "images as a folder, or add it to evaluate.references"
            )
        files = image_files(folder) if folder.is_dir() else []
        if not files:
            raise DetectorError(f"no reference images of {concept_id!r} in {folder}")
        images = [ImageOps.exif_transpose(Image.open(f)).convert("RGB") for f in files]
        # the most confident face of each reference photo (detect_faces sorts them so)
        found = [e[:1] for e in self.embed(images) if len(e)]
        if not found:
            raise DetectorError(
                f"MTCNN found no face in the {len(files)} reference images of "
                f"{concept_id!r} in {folder}"
            )
        c = torch.nn.functional.normalize(torch.cat(found).mean(0), dim=0)
        self._centroids[concept_id] = c
        return c

    def score(
        self, images: np.ndarray, concept_id: str, concept_type: str
    ) -> tuple[np.ndarray, np.ndarray]:
        target = self.centroid(concept_id)
        rivals = [self.centroid(c) for c in self.references if c != concept_id]
        others = torch.stack(rivals) if rivals else torch.zeros(0, len(target))
        if len(images) == 0:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        probs, recognised = [], []
        for emb in self.embed([Image.fromarray(im) for im in images]):
            if len(emb) == 0:  # no face: not this person
                probs.append(0.0)
                recognised.append(False)
                continue
            cos = emb @ target
            best = int(cos.argmax())
            probs.append(float(torch.sigmoid((cos[best] - MATCH_COS) / MATCH_WIDTH)))
            rival = float((emb[best] @ others.T).max()) if len(others) else -1.0
            recognised.append(bool(cos[best] > MATCH_COS and cos[best] > rival))
        return np.asarray(probs, np.float32), np.asarray(recognised, bool)
