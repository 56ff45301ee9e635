"""The closed loop: re-steer a concept only as hard as it needs, and stop by name when it
cannot be forgotten without moving another concept.

A fixed re-steering strength misses some concepts and destroys a neighbour of others, and
where that edge lies differs per concept (docs/resteer.md). So each rung of the type's
ladder (fmn.manifest.type_ladder, gentlest first) is judged before the next is tried:

1. **Which concepts could the patch have moved?** Re-steering edits the cross-attention
   keys and values of the text, so a concept is exposed in proportion to how much the
   patch changes *its* keys and values. Every whole word of the tokenizer's vocabulary
   (in its type's first template), and every preserved concept, is ranked by that relative
   change (`kv_change`: two Gram matrices, no image); the `WATCH` most changed are watched.
   No list of names is needed: the vocabulary is the model's own.
2. **Is the concept gone, and did a watched one move?** The base model judges the patched
   model's images (fmn.train.judge.self_judged: a diffusion classifier over the empty
   prompt, the concept and the watched ones). The concept is gone where at most
   `GONE_SHARE` of its images are still attributed to it and another prompt explains them
   better by at least its base margin (`_gone`); a watched concept moved where its
   share fell by at least `MOVED_DROP` from the base model's own images of it and another
   prompt now explains its images better by at least its base margin (`_moved`). Only
   words whose own images the base model attributes to them rather than to the empty
   prompt (`RECOGNISED`) are watched, and not a word the base model draws as the concept
   itself (`phrasing_of`: an unlisted synonym is meant to go with it; the verdict lists it).

Gone and nothing moved: the rung's patch ships. A watched concept moved: stop, the concept
fails by name (a stronger rung would move it further). Still drawn: the next rung; after the
last the concept fails as not forgotten. The rules and thresholds were chosen on
crowd-world's tune identities and tiny-world's carol and outline (docs/resteer.md, "The
closed loop", which also has their held-out effect). Nothing here reads the world's labels
or classifier.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from fmn.model.attention import token_weights
from fmn.model.conditioning import (
    CONCEPT_TEMPLATES,
    concept_token_ids,
    encode_text,
    whole_words,
)
from fmn.model.load import model_family
from fmn.model.patch import Patch
from fmn.train.judge import Judged, self_judged
from fmn.train.resteer import PARAM_PATTERNS, ResteerConfig, ResteerError

GONE_SHARE = 0.25  # of the concept's judged images still attributed to it: 1 of 4
MOVED_DROP = 0.5  # fall of a watched concept's share that stops the loop: 2 of 4 images
RECOGNISED = 1.0  # a candidate is watched where all its own images are judged its own
JUDGEABLE = 0.5  # the concept's own base share below which no verdict is possible
SAME_SHARE = 0.5  # set a priori, not tuned: a majority of a word's images read as the concept
WATCH = 4  # most-changed concepts judged per rung
CANDIDATES = 6  # most-changed candidates looked at, most changed first
JUDGE_IMAGES = 4  # images per concept and judgement
# per text encoder (weakly: an id() could be reused by the next pipeline's encoder)
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # -> {type: (words, states)}
_RECOGNISED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # -> {(text, type): share}
_SAME: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # -> {(text, type, words): bool}


class NotForgotten(ResteerError):
    """The loop could not forget a concept without moving another one, or at all; the
    message names both. `result` holds the last rung's ForgetResult (never shipped)."""

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Verdict:
    gone: bool
    moved: list[str]  # watched concepts whose images are no longer theirs
    target: Judged
    target_base: Judged  # the base model's judgement of its own images of the concept
    watched: dict[str, dict] = field(default_factory=dict)  # text -> base, patched, kv
    seconds: float = 0.0
    phrasings: list[str] = field(default_factory=list)  # changed words the model draws as it

    def as_record(self) -> dict:
        return {
            "target_share": round(self.target.share, 4),
            "target_base_share": round(self.target_base.share, 4),
            "target_base_margin": round(self.target_base.margin, 5),
            "target_margin": round(self.target.margin, 5),
            "gone": self.gone,
            "moved": self.moved,
            "watched": self.watched,
            "phrasings": self.phrasings,
            "judge_seconds": round(self.seconds, 2),
        }


def concept_states(
    pipe, concepts: Sequence[tuple[str, str]], token_ids: Sequence[int] | None = None
) -> torch.Tensor:
    """[N, 2, D] text states of each (text, type) in its type's first template: the mean
    over the concept's own tokens, and the first end-of-text token (which carries it).
    token_ids: each text's one token id, where every text is one token (the vocabulary:
    found by id, without tokenising each word again)."""
    out: list[torch.Tensor | None] = [None] * len(concepts)
    for kind in dict.fromkeys(k for _, k in concepts):
        mine = [i for i, (_, k) in enumerate(concepts) if k == kind]
        for start in range(0, len(mine), 512):
            chunk = mine[start : start + 512]
            prompts = [CONCEPT_TEMPLATES[kind][0].format(concepts[i][0]) for i in chunk]
            cond = encode_text(pipe, prompts)
            for b, i in enumerate(chunk):
                row = cond.input_ids[b]
                eot = int((row == cond.eos_id).nonzero()[0, 0])
                if token_ids is not None:
                    own = row == token_ids[i]
                else:
                    ids = concept_token_ids(pipe.tokenizer, concepts[i][0])
                    own = token_weights(row[None], ids, "concept")[0] > 0
                if not own.any():  # tokenised differently inside the template
                    own = torch.arange(len(row)) == eot - 1  # its last token
                out[i] = torch.stack([cond.embeds[b, own].mean(0), cond.embeds[b, eot]])
    return torch.stack(out).float()


@torch.no_grad()
def _one_token_states(pipe, kind: str, ids: Sequence[int]) -> torch.Tensor | None:
    """concept_states of one-token words, without tokenising tens of thousands of prompts
    (most of the cost): each prompt's ids are the template's own around the word's id, cut
    after the end-of-text token, which the causal text encoder makes exact. SD1/SD2 only,
    whose encode_prompt is the text encoder's last hidden state; None otherwise."""
    enc, tok = pipe.text_encoder, pipe.tokenizer
    if model_family(pipe) == "sdxl" or getattr(enc.config, "use_attention_mask", False):
        return None
    before, after = CONCEPT_TEMPLATES[kind][0].split("{}")
    if after.strip():
        return None
    prefix = tok(before.strip(), add_special_tokens=False).input_ids
    head = [tok.bos_token_id, *prefix]
    out = []
    for start in range(0, len(ids), 2048):
        chunk = torch.tensor(ids[start : start + 2048])[:, None]
        rows = torch.cat(
            [
                torch.tensor(head).expand(len(chunk), -1),
                chunk,
                torch.full_like(chunk, tok.eos_token_id),
            ],
            dim=1,
        )
        states = enc(rows.to(enc.device))[0].float().cpu()
        out.append(states[:, -2:])  # the word, then the end-of-text token
    return torch.cat(out)


def vocabulary_states(pipe, kind: str) -> tuple[list[str], torch.Tensor]:
    """Every whole word of the tokenizer's vocabulary (letters only, 3 or more) and its
    concept_states as a concept of `kind`; computed once per text encoder and type."""
    mine = _STATES.setdefault(pipe.text_encoder, {})
    if kind not in mine:
        vocab = whole_words(pipe.tokenizer)
        words, ids = list(vocab), list(vocab.values())
        states = _one_token_states(pipe, kind, ids)
        if states is None:
            states = concept_states(pipe, [(w, kind) for w in words], ids)
        mine[kind] = (words, states)
    return mine[kind]


def kv_change(pipe, deltas: dict[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
    """[N]: each state set's relative change of cross-attention keys and values under the
    patch, sum ||dW s||^2 / sum ||W s||^2 over the to_k/to_v layers and its two states
    (through Gram matrices: the cost does not grow with the layers' width)."""
    d = states.shape[-1]
    moved, held = torch.zeros(d, d), torch.zeros(d, d)
    params = dict(pipe.unet.named_parameters())
    pattern = re.compile(PARAM_PATTERNS["to_kv"])
    for name, delta in deltas.items():
        if pattern.search(name) and delta.shape[-1] == d:
            w = params[name].detach().float().cpu()
            dw = delta.float().cpu()
            moved += dw.T @ dw
            held += w.T @ w
    s = states.reshape(-1, d)
    num = ((s @ moved) * s).sum(-1).reshape(states.shape[:2]).sum(1)
    den = ((s @ held) * s).sum(-1).reshape(states.shape[:2]).sum(1)
    return num / den.clamp_min(1e-12)


def most_changed(
    pipe,
    patch: Patch,
    text: str | Sequence[str],
    kind: str,
    preserve: Sequence[tuple[str, str]] = (),
    k: int = CANDIDATES,
) -> list[tuple[str, str, float]]:
    """The `k` concepts (text, type, relative key/value change) the patch changes most,
    among the vocabulary's words as concepts of `kind` and the preserved concepts; never
    the concept itself or one of its words (`text` may be the concept's phrasings)."""
    phrasings = [text] if isinstance(text, str) else list(text)
    own = {w.lower() for p in phrasings for w in [p, *p.split()]}
    words, states = vocabulary_states(pipe, kind)
    change = kv_change(pipe, patch.deltas, states)
    ranked = [(words[i], kind, float(change[i])) for i in change.argsort(descending=True).tolist()]
    kept = [p for p in dict.fromkeys(preserve) if p[0].lower() not in own]
    if kept:
        pc = kv_change(pipe, patch.deltas, concept_states(pipe, kept))
        ranked += [(t, kk, float(c)) for (t, kk), c in zip(kept, pc, strict=True)]
        ranked.sort(key=lambda x: -x[2])
    out, seen = [], set()
    for t, kk, c in ranked:
        if t.lower() in own or t.lower() in seen:
            continue
        seen.add(t.lower())
        out.append((t, kk, c))
        if len(out) == k:
            break
    return out


def judge_patch(
    pipe,
    patch: Patch,
    text: str | Sequence[str],
    kind: str,
    preserve: Sequence[tuple[str, str]] = (),
    *,
    watch: int = WATCH,
    images: int = JUDGE_IMAGES,
) -> Verdict:
    """One rung's verdict: is the concept gone from the patched model's images, and did
    one of the `watch` concepts the patch changes most (that the base model recognises)
    move? `text` may be a concept's phrasings: its images then cycle over them, and each
    is judged against the prompt it was drawn with. `pipe` comes back unpatched."""
    t0 = time.time()
    candidates = most_changed(pipe, patch, text, kind, preserve)
    if not isinstance(text, str):
        text = text[0] if len(text) == 1 else tuple(text)  # one judged name for all words
    watched, same = [], []
    for c in candidates:  # most changed first, until `watch` are watched
        if len(watched) == watch:
            break
        if not recognised(pipe, c[0], c[1], images):
            continue
        # a word the base model draws as the concept is one more way to reach it: it is
        # meant to go with it, so its moving stops nothing (it is reported instead)
        if c[1] == kind and phrasing_of(pipe, c[0], text, kind, images):
            same.append(c)
        else:
            watched.append(c)
    judged = [(text, kind), *[(t, k) for t, k, _ in watched]]
    # shares are relative to the prompts judged together: the base model's, among the same
    before = self_judged(pipe, None, judged, images=images)
    after = self_judged(pipe, patch, judged, images=images)
    record = {
        t: {
            "base": round(before[t].share, 4),
            "patched": round(after[t].share, 4),
            "base_margin": round(before[t].margin, 5),
            "patched_margin": round(after[t].margin, 5),
            "kv": round(c, 4),
        }
        for t, _, c in watched
    }
    moved = [t for t, _, _ in watched if _moved(before[t], after[t])]
    gone = _gone(before[text], after[text])
    return Verdict(
        gone, moved, after[text], before[text], record, time.time() - t0, [c[0] for c in same]
    )


def _gone(before: Judged, after: Judged) -> bool:
    """The concept is gone where at most GONE_SHARE of its images are still its own and
    another prompt explains them better by at least as much as its own prompt explained
    the base model's (as `_moved`). The share alone called crowd-world's donald gone after
    a patch that left him at 0.93 of base by the world's classifier."""
    return after.share <= GONE_SHARE and _flipped(before, after)


def _moved(before: Judged, after: Judged) -> bool:
    """A watched concept moved where fewer of its images are its own by MOVED_DROP and
    another prompt now explains them better by at least as much as its own prompt
    explained the base model's images (margin <= -base margin: scale-free, so no error
    unit of one model is baked in). The share alone also fell for patches after which the
    world's classifier still read the concept at 0.97 of base."""
    return after.share <= before.share - MOVED_DROP and _flipped(before, after)


def _flipped(before: Judged, after: Judged) -> bool:
    """Another prompt now explains the images better by at least as much as the concept's
    own prompt explained the base model's (margin <= -base margin)."""
    return after.margin <= -before.margin


def recognised(pipe, text: str, kind: str, images: int = JUDGE_IMAGES) -> bool:
    """Whether the base model attributes at least RECOGNISED of its own images of `text`
    to it rather than to the empty prompt (a word the model draws as nothing in
    particular cannot be watched); once per text encoder and concept."""
    mine = _RECOGNISED.setdefault(pipe.text_encoder, {})
    if (text, kind) not in mine:
        mine[(text, kind)] = self_judged(pipe, None, [(text, kind)], images=images)[text].share
    return mine[(text, kind)] >= RECOGNISED


def _named(words: Sequence[str]) -> str:
    return " / ".join(repr(w) for w in words)


def phrasing_of(
    pipe, word: str, concept: str | tuple[str, ...], kind: str, images: int = JUDGE_IMAGES
) -> bool:
    """Whether the base model draws `word` as the concept: it attributes at most SAME_SHARE
    of its own images of `word` to `word` when the concept's prompts compete (a synonym
    such as "dark" for night; an identity's neighbour keeps its own name). Once per text
    encoder, word and concept."""
    mine = _SAME.setdefault(pipe.text_encoder, {})
    key = (word, kind, concept)
    if key not in mine:
        judged = self_judged(pipe, None, [(word, kind), (concept, kind)], images=images)
        mine[key] = judged[word].share <= SAME_SHARE
    return mine[key]


class Loop:
    """One concept's walk up its ladder (its config's `rungs`): `config()` is the rung to
    re-steer at now, `judge()` takes that rung's result and decides; `done` once it has."""

    def __init__(self, cfg: ResteerConfig) -> None:
        self.cfg, self.rungs = cfg, cfg.rungs
        self.at = 0
        self.status, self.reason = "", ""  # status set once it has decided
        self.history: list[dict] = []

    @property
    def done(self) -> bool:
        return bool(self.status)

    def config(self) -> ResteerConfig:
        return replace(self.cfg, **self.rungs[self.at])

    def judge(self, pipe, result, data, preserve) -> None:
        """Judge the ForgetResult of prepared `data` re-steered at the current rung."""
        cfg = self.config()
        words = data.words if len(data.words) > 1 else data.text  # one word: as it was
        v = judge_patch(pipe, result.patch, words, data.concept_type, preserve)
        rung = f"rung {self.at + 1} of {len(self.rungs)}"
        how = f"positions {cfg.positions}, preserve_weight {cfg.preserve_weight:g}"
        self.history.append(
            {
                "rung": self.at + 1,
                "positions": cfg.positions,
                "preserve_weight": cfg.preserve_weight,
                "steps": cfg.steps,
                "resteer_seconds": round(result.resteer.seconds, 2),
                **v.as_record(),
            }
        )
        steps = sum(h["steps"] for h in self.history)
        if v.target_base.share < JUDGEABLE:
            self._end(
                "unjudged",
                f"the base model attributes only {v.target_base.share:.0%} of its own images of "
                f"{_named(data.words)} to it, so the loop cannot tell whether it is gone: shipped "
                f"{rung} ({how}) unjudged",
            )
        elif v.moved:
            self._end(
                "failed",
                f"stopped: {', '.join(repr(m) for m in v.moved)} moved at {rung} ({how}) "
                f"while {_named(data.words)} was {'gone' if v.gone else 'still drawn'} "
                f"({v.target.share:.0%} of its images); nothing shipped",
            )
        elif v.gone:
            self._end("forgotten", f"forgotten after {steps} steps ({rung}: {how})")
        elif self.at + 1 < len(self.rungs):
            self.at += 1
        else:
            self._end(
                "failed",
                f"still drawn after {steps} steps, at the last rung ({how}): "
                f"{v.target.share:.0%} of its images; nothing shipped",
            )

    def _end(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason

    def record(self) -> dict:
        """How far the loop went and why it stopped: resteer.json, the patch and the
        report carry it."""
        return {
            "status": self.status or "running",
            "reason": self.reason,
            "rung": self.at + 1,
            "rungs": len(self.rungs),
            "steps": sum(h["steps"] for h in self.history),
            "resteer_seconds": round(sum(h["resteer_seconds"] for h in self.history), 2),
            "judge_seconds": round(sum(h["judge_seconds"] for h in self.history), 2),
            "history": self.history,
        }
