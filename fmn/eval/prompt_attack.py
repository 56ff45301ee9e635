"""The prompt attack: a search over the tokenizer's real words for a prompt that makes an
audited model draw a removed concept again.

White-box, as UnlearnDiffAtk (Zhang et al. 2024) attacks unlearned models: the attacker
holds the base model's images of the concept and the audited model's weights, and looks for
words whose prompt makes the audited model denoise those images best (its diffusion loss,
the same one textual inversion minimises). The words are real vocabulary tokens, found as
PEZ (Wen et al. 2023) finds hard prompts: continuous vectors whose forward pass uses their
nearest whole-word token embeddings, the gradient updating the continuous ones
(`fmn.train.invert.invert(project=...)`). What comes out is plain text anyone can type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fmn.model.conditioning import whole_words
from fmn.train.invert import InvertConfig, invert

# words the search fills in place of the concept's name: a short phrase, set by hand and
# not chosen by looking at any detector's numbers
PROMPT_TOKENS = 3
# PEZ's learning rate for the continuous vectors: token embeddings are far apart, so a
# textual inversion's rate would never move a vector to another word
PROMPT_LR = 0.1


@dataclass
class FoundPrompt:
    words: str  # what the search found, as text: the attack draws it in the type's prompts
    token_ids: list[int]
    losses: list[float]


def search_prompt(
    pipe,
    latents: torch.Tensor,
    concept_type: str,
    *,
    steps: int,
    seed: int = 0,
    tokens: int = PROMPT_TOKENS,
    progress: Callable[[int, int, float], None] | None = None,
) -> FoundPrompt:
    """`tokens` whole words of the tokenizer's vocabulary that, put where the concept's
    name goes in its type's templates, make `pipe` denoise `latents` (the concept's images,
    VAE-scaled) best. SD1/SD2 (one text encoder)."""
    vocab = whole_words(pipe.tokenizer)
    ids = torch.tensor(list(vocab.values()))
    table = pipe.text_encoder.get_input_embeddings().weight.detach()[ids]
    sq = table.pow(2).sum(1)

    def nearest(v: torch.Tensor) -> torch.Tensor:  # [n] indices into `ids`, by L2 distance
        return (sq[None] - 2 * v.detach().to(table) @ table.T).argmin(1)

    def project(v: torch.Tensor) -> torch.Tensor:
        return table[nearest(v)].to(v)

    cfg = InvertConfig(tokens=tokens, steps=steps, lr=PROMPT_LR, seed=seed)
    ti = invert(pipe, latents, "<prompt-attack>", cfg, concept_type, progress, project=project)
    chosen = ids[nearest(ti.vectors["text_encoder"])].tolist()
    words = [pipe.tokenizer.convert_ids_to_tokens(i).removesuffix("</w>") for i in chosen]
    return FoundPrompt(" ".join(words), chosen, ti.losses)
