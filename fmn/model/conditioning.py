"""Text conditioning for every supported family, computed once and reused every step.

SD1.x/SD2.x condition the UNet on one text encoder's hidden states; SDXL concatenates two
encoders' states and adds a pooled embedding and size/crop ids. `TextConditioning` hides
that difference from the training loops.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fmn.model.load import model_family


@dataclass
class TextConditioning:
    prompts: list[str]
    input_ids: torch.Tensor  # [P, T] ids of the first tokenizer (positions agree across SDXL's two)
    embeds: torch.Tensor  # [P, T, D] what the UNet's attn2 keys/values read
    pooled: torch.Tensor | None = None  # SDXL only: [P, D2]
    time_ids: torch.Tensor | None = None  # SDXL only: [P, 6]
    eos_id: int = 49407
    extra: dict = field(default_factory=dict)

    def select(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(encoder_hidden_states, extra UNet kwargs) for the prompts at idx."""
        kwargs = {}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled[idx],
                "time_ids": self.time_ids[idx],
            }
        return self.embeds[idx], kwargs


def token_ids(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """[len(prompts), max_length] ids, padded to the full length and truncated, as the
    pipelines tokenise (max_length: the tokenizer's model_max_length unless given)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_text(
    pipe, prompts: list[str], image_hw: tuple[int, int] | None = None
) -> TextConditioning:
    """Encode prompts with the pipeline's own encode_prompt (so clip-skip, projections and
    SDXL's penultimate-layer choice match what generation does)."""
    tok = pipe.tokenizer
    # encode_prompt expands a multi-vector TI token "<t>" to "<t> <t>_1 ..."; the ids used
    # to find token positions must see the same expansion
    expanded = (
        pipe.maybe_convert_prompt(list(prompts), tok)
        if hasattr(pipe, "maybe_convert_prompt")
        else prompts
    )
    ids = token_ids(tok, list(expanded))
    device = pipe.unet.device
    if model_family(pipe) == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=device, do_classifier_free_guidance=False
        )
        h, w = image_hw or (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype).repeat(len(prompts), 1)
        return TextConditioning(
            list(prompts), ids, embeds, pooled, time_ids, eos_id=tok.eos_token_id
        )
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return TextConditioning(list(prompts), ids, embeds, eos_id=tok.eos_token_id)


# Prompts a concept trains on, and where its tokens sit in them

# Prompts that show the concept, per type. Generic English, never the world's labels: the
# same templates serve a real checkpoint.
CONCEPT_TEMPLATES: dict[str, list[str]] = {
    "id": ["a photo of {}", "a portrait of {}", "a picture of {}", "an image of {}"],
    "object": ["a photo of a {}", "a picture of a {}", "an image of a {}", "a photo of the {}"],
    "style": [
        "a picture in the style of {}",
        "an image in the style of {}",
        "a photo in the style of {}",
        "art in the style of {}",
    ],
    "nsfw": ["a photo of {}", "a picture of {}", "an image of {}", "{}"],
}


def concept_prompts(text: str | Sequence[str], concept_type: str) -> list[str]:
    """The concept's training prompts: its type's templates, each with every phrasing in
    turn when `text` is a concept's words ("night", "midnight")."""
    words = [text] if isinstance(text, str) else list(text)
    return [t.format(w) for t in CONCEPT_TEMPLATES[concept_type] for w in words]


def cycled_prompts(text: str | Sequence[str], concept_type: str, n: int) -> list[str]:
    """n prompts of the concept, its prompts in turn (image i uses prompt i)."""
    prompts = concept_prompts(text, concept_type)
    return [prompts[i % len(prompts)] for i in range(n)]


def concept_token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def words_token_ids(tokenizer, words: str | Sequence[str]) -> list[list[int]]:
    """Each phrasing's token ids: the alternatives fmn.model.attention.token_weights finds."""
    return [concept_token_ids(tokenizer, w) for w in ([words] if isinstance(words, str) else words)]


_WORD = re.compile(r"[a-z]{3,}")  # a whole word: letters only, 3 or more


def whole_words(tokenizer) -> dict[str, int]:
    """Every whole word of a CLIP tokenizer's vocabulary (one token, letters only, 3 or
    more) and its token id, sorted by word: the words the closed loop watches and the
    prompt attack searches."""
    suffix = "</w>"
    vocab = {
        w[: -len(suffix)]: i
        for w, i in tokenizer.get_vocab().items()
        if w.endswith(suffix) and _WORD.fullmatch(w[: -len(suffix)])
    }
    return dict(sorted(vocab.items()))
