"""The `clip` detector: zero-shot classification over the manifest's concept texts.

For a concept of type t, the classes are every manifest concept of type t (targets and
preserved) plus one neutral "none" class, so the probability is not forced onto some
concept when the image shows none of them, and a type with a single concept still has a
choice. The model comes from a local folder in transformers' layout (CLIPModel weights in
safetensors, tokenizer files, optionally preprocessor_config.json); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fmn.eval.mscore.base import DetectorError

# How a class is phrased per type: CLIP was trained on captions, not bare names.
CLASS_TEMPLATES = {
    "id": "a photo of {}",
    "object": "a photo of a {}",
    "style": "a picture in the style of {}",
    "nsfw": "a photo of {}",
}
# The "none of them" class per type: the generic picture the concept would be missing from.
NONE_PROMPTS = {
    "id": "a photo of a person",
    "object": "a photo of an object",
    "style": "a picture",
    "nsfw": "a photo of a fully clothed person",
}


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is projected; 4.x a tensor
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def load_clip(folder: Path):
    """(model, tokenizer, image processor) from a local folder; refuses pickled weights."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DetectorError(
            f"{folder} is not a CLIP model folder (no config.json); save one with "
            "CLIPModel.save_pretrained() and the tokenizer beside it (evaluate.clip_model)"
        )
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DetectorError(f"could not load the CLIP model in {folder}: {e}") from None
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) != vocab:  # a tokenizer built from missing files has a handful of ids
        raise DetectorError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens, the model {vocab}: "
            "save the model's own tokenizer (vocab.json, merges.txt) beside it"
        )
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:
        side = model.config.vision_config.image_size
        processor = CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    return model.eval(), tokenizer, processor


class ClipDetector:
    """Zero-shot CLIP: softmax over the type's concept texts and the 'none' prompt;
    recognised when the concept is the top-1 class (so also more likely than 'none')."""

    name = "clip"

    def __init__(self, folder: Path, concepts: Sequence[tuple[str, str, str]]) -> None:
        self.model, self.tokenizer, self.processor = load_clip(folder)
        self.concepts = list(concepts)  # (id, type, text)
        self._classes: dict[str, tuple[list[str], torch.Tensor]] = {}

    @torch.no_grad()
    def classes(self, concept_type: str) -> tuple[list[str], torch.Tensor]:
        """(ids, [K + 1, D] unit text features): the type's concepts, then 'none'."""
        if concept_type not in self._classes:
            mine = [(cid, text) for cid, t, text in self.concepts if t == concept_type]
            template = CLASS_TEMPLATES[concept_type]
            prompts = [template.format(text) for _, text in mine] + [NONE_PROMPTS[concept_type]]
            tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            feats = _features(self.model.get_text_features(**tokens))
            self._classes[concept_type] = ([cid for cid, _ in mine], feats)
        return self._classes[concept_type]

    @torch.no_grad()
    def score(
        self, images: np.ndarray, concept_id: str, concept_type: str
    ) -> tuple[np.ndarray, np.ndarray]:
        ids, text = self.classes(concept_type)
        if concept_id not in ids:
            raise DetectorError(
                f"the clip detector classifies the manifest's {concept_type} concepts "
                f"({', '.join(ids) or 'none'}), not {concept_id!r}"
            )
        if len(images) == 0:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        k = ids.index(concept_id)
        scale = self.model.logit_scale.exp().float()
        probs = []
        for chunk in np.array_split(images, max(1, len(images) // 32)):
            pixels = self.processor(images=list(chunk), return_tensors="pt").pixel_values
            feats = _features(self.model.get_image_features(pixel_values=pixels))
            probs.append(torch.softmax(scale * feats @ text.T, dim=-1))
        p = torch.cat(probs).numpy()
        return p[:, k], p.argmax(1) == k
