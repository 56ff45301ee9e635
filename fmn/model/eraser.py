"""Gated text-state erasure: many concepts out of one model, the rest bit-exact.

Every edit of the cross-attention key/value weights (re-steering, UCE, MACE's closed form)
is linear in the text states, so it moves every prompt whose states share a direction with
a target's. Where people's names sit close together in the text space, no such edit takes
one person out without others (docs/mass.md). This eraser is not linear in the states:

- a **gate** per concept fires on a prompt when the prompt's text states at some position
  come within `radius` of the concept's own states: its **prototypes**, the states at the
  concept's last token and at the first end-of-text token, in every template of its type
  and every phrasing. Distances are taken after whitening by the covariance of a
  vocabulary's states, so the directions in which prompts differ most count least;
- the radius is a share (fmn.merge.gates.RADIUS_SHARE) of the distance from the
  prototypes to the nearest state of any other prompt it is checked against: every whole
  word of the tokenizer in the type's first two templates ("a photo of {w}"), the generic
  anchor prompts and the manifest's preserved concepts. So no such prompt can fire the
  gate; prompts that never come near a target pass through unchanged;
- a fired prompt's states (every position after the start token) go through x -> x + x D U,
  a low-rank map fitted (ridge) to send the concept's states from its last token on to the
  anchor prompt's ("a person" in the same template), aligned from the end, and the
  template's words before the concept to themselves;
- **words anywhere**: a concept's word inside a longer prompt ("a photo of a red circle in
  the style of dots") moves both prototype states out of reach, because every state of a
  causal text encoder depends on the words before it. So each word of a prompt (and each
  run of up to as many words as the concept's longest phrasing) is also checked on its
  own, in the concept's first template ("a photo of a {}"), against the same prototypes
  and radius (the radius was measured in that template, so again no other word of the
  vocabulary can fire). A word that fires is replaced by the concept's anchor words
  ("circle" -> "thing") and the prompt is encoded again: the rest of the prompt, and so
  every other concept it names, keeps its words. Where the rewritten prompt's tokens
  align with the original's (every token outside the word, the anchor's last token for
  the word's last, the end of text and the pads), its states go `overshoot` further, away
  from the original's: an anchor that itself draws the concept a little does not bring it
  back. A style's word is dropped instead, with its lead-in ("a cat in the style of
  dots" -> "a cat"; fmn.data.anchors.GATE_DROPS), and such a prompt's states go
  `dropped` further;
- **routes** (a correction, `action: correct` with guide prompts): a fired word is
  replaced by its guide's words, each in turn ("a photo of a doctor" -> "a photo of john",
  then "... of ruth", ...: one guide per prompt the text encoder is given, so a pipeline
  call with one prompt per image draws the guides in proportion), with no push: the guide
  is drawn as its own words draw it. A route acts on words only (its whole-prompt map is
  zero).

**Robust mode** (`lock`, the manifest's `merge.robust`): a learned token can carry any
embedding, and textual inversion finds one whose states draw a gated concept from outside
every gate (nothing else stops it: the UNet still draws the concept). A locked eraser
reads every token as a word of the base model's own vocabulary: a token the base
tokenizer does not have (one a textual inversion added) or whose embedding row changed
since install is read as the vocabulary word whose embedding is nearest to it, so the
gates see real words. The gradient passes straight through (as PEZ's projection does), so
an inversion becomes a search over real words, the prompt attack the gates were fitted
against. It costs a copy of the token embedding table; a user's own textual inversions
are read as their nearest words too.

Nothing here reads an image or a detector. The gate sits on the text encoder's output (a
forward hook), so it acts on whatever reads the text states; SD 1.x / 2.x pipelines (one
text encoder, no clip-skip). It is stored as one safetensors file and installed by
`fmn.model.load.load_pipeline` when a model folder carries it. Fitting is in
fmn.merge.gates.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

ERASER_FILE = "eraser.safetensors"
FORMAT = 4
READS = ("3", "4")  # format 3: no routes
_CACHE = 100_000  # checked words kept per installed eraser (prompts repeat across images)


class EraserError(ValueError):
    """An eraser that cannot be fitted or installed as asked."""


@dataclass
class ConceptGate:
    id: str
    prototypes: torch.Tensor  # [k, D] whitened states of the concept's prompts
    radius: float
    nearest: float  # distance to the nearest other prompt's state (radius = share of it)
    down: torch.Tensor  # [D, r]
    up: torch.Tensor  # [r, D]
    anchor: str = "a person"  # the words a fired word of the concept is replaced with
    template: str = "{}"  # where a prompt's words are checked: its type's first template
    words: int = 1  # the most words any of its phrasings has (longest run checked)
    # None: a fired word is replaced by `anchor`. Else the word is dropped, with these words
    # when they come right before it ("a cat in the style of dots" -> "a cat").
    lead: str | None = None
    near: str = ""  # the nearest other prompt, which bounds the radius ("'jeff'")
    # words nobody listed that the base model draws like the concept, taken into its
    # prototypes: [(word, share)] (fmn.merge.similar)
    similar: list[tuple[str, float]] = field(default_factory=list)
    # a correction's route: a fired word is replaced by these words in turn, not by `anchor`
    guides: list[str] = field(default_factory=list)

    def meta(self) -> dict:
        out = {"id": self.id, "nearest": self.nearest, "anchor": self.anchor,
               "template": self.template, "words": self.words, "lead": self.lead,
               "near": self.near, "similar": self.similar}  # fmt: skip
        # only where routed: a gate without a route keeps the fingerprint it had in format 3
        return out | ({"guides": self.guides} if self.guides else {})

    def reason(self) -> str:
        """How far the gate reaches and what stopped it, for logs and reports."""
        also = ", ".join(f"{w!r} ({s:.2f})" for w, s in self.similar)
        routed = ", ".join(map(repr, self.guides))
        return (
            ("routed" if self.guides else "gated")
            + f": fires within {self.radius:.3g} of its prompts' states, "
            f"{self.radius / self.nearest:.2g} of the way to the nearest other prompt, "
            f"{self.near or '?'} ({self.nearest:.3g})"
            + (f"; also on words the base model draws like it: {also}" if also else "")
            + (f"; replaced in turn by {routed}" if routed else "")
        )


@dataclass
class Eraser:
    """Gates and maps of several concepts over one text encoder."""

    mean: torch.Tensor  # [D]
    whiten: torch.Tensor  # [D, D]
    gates: list[ConceptGate]
    soft: float  # the gate's edge: full within (1 - soft) * radius, nothing beyond radius
    config: dict = field(default_factory=dict)
    overshoot: float = 0.0  # a replaced word's states go this far past the anchor's
    dropped: float = 0.0  # a dropped word's: this far past the prompt without it
    lock: bool = False  # robust mode: every token is read as a word of the base vocabulary

    @property
    def concepts(self) -> list[str]:
        return [g.id for g in self.gates]

    def reach(self, states: torch.Tensor, template: str) -> torch.Tensor:
        """[B, C] each gate's reach (0..1) on states [B, T, D], counting only the gates
        checked in `template` (the others read 0)."""
        dev = states.device
        w = (states.float() - self.mean.to(dev)) @ self.whiten.to(dev)
        out = torch.zeros(states.shape[0], len(self.gates), device=dev)
        for j, g in enumerate(self.gates):
            if g.template == template:
                out[:, j] = self._reach(w, g)
        return out

    def _reach(self, w: torch.Tensor, g: ConceptGate) -> torch.Tensor:
        d = torch.cdist(w, g.prototypes.to(w.device).expand(len(w), -1, -1)).amin(-1)
        return ((g.radius - d) / (self.soft * g.radius)).clamp(0, 1).amax(-1)

    def fired(self, states: torch.Tensor) -> torch.Tensor:
        """[B, C]: how strongly each concept's gate fires on each prompt (0..1)."""
        dev = states.device
        w = (states[:, 1:].float() - self.mean.to(dev)) @ self.whiten.to(dev)
        out = torch.zeros(states.shape[0], len(self.gates), device=dev)
        for j, g in enumerate(self.gates):
            out[:, j] = self._reach(w, g)
        return out

    def edit(self, states: torch.Tensor) -> torch.Tensor:
        """The states with every fired concept's map applied; a prompt no gate fires on
        comes back bit-exact (its change is an exact zero)."""
        fire = self.fired(states)
        if not bool((fire > 0).any()):
            return states
        x = states[:, 1:].float()
        dx = torch.zeros_like(x)
        for j, g in enumerate(self.gates):
            if bool((fire[:, j] > 0).any()):
                mapped = (x @ g.down.to(x.device)) @ g.up.to(x.device)
                dx += fire[:, j, None, None] * mapped
        out = states.clone()
        out[:, 1:] = (x + dx).to(states.dtype)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the eraser computes with, by name (its file, its fingerprint)."""
        out = {"mean": self.mean, "whiten": self.whiten, "soft": torch.tensor([self.soft])}
        out["overshoot"] = torch.tensor([self.overshoot, self.dropped])
        if self.lock:  # only where locked: an unlocked eraser keeps its format-3 fingerprint
            out["lock"] = torch.tensor([1.0])
        for j, g in enumerate(self.gates):
            out |= {f"{j}.prototypes": g.prototypes, f"{j}.down": g.down, f"{j}.up": g.up}
            out[f"{j}.radius"] = torch.tensor([g.radius], dtype=torch.float64)
        return out


# ---- words anywhere in a prompt ----------------------------------------------------------


class WordCheck:
    """An eraser bound to a pipeline's tokenizer and text encoder: finds the words of a
    prompt's ids (CLIP's BPE marks a word's last token with "</w>"; a token added by a
    textual inversion is a word of its own), checks each run of words in its gates'
    templates, and replaces the fired ones by their anchors."""

    def __init__(self, eraser: Eraser, tokenizer, text_encoder):
        self.eraser, self.text_encoder = eraser, text_encoder
        vocab = tokenizer.get_vocab()
        self.word_end = torch.ones(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
        for token, i in vocab.items():
            if i not in tokenizer.added_tokens_decoder:
                self.word_end[i] = token.endswith("</w>")
        self.start, self.end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end
        self.tail = {self.end, self.pad}  # what follows a prompt's last word

        def ids(text: str) -> list[int]:
            return tokenizer(text.strip(), add_special_tokens=False).input_ids

        self.templates = {}  # template -> (ids before the word, ids after it)
        for g in eraser.gates:
            before, after = g.template.split("{}")
            self.templates[g.template] = (ids(before), ids(after))
        self.anchors = [[] if g.lead is not None else ids(g.anchor) for g in eraser.gates]
        self.routes = [[ids(w) for w in g.guides] for g in eraser.gates]
        self.turns = [0] * len(eraser.gates)  # each route's words routed since install
        self.leads = [ids(g.lead) if g.lead else [] for g in eraser.gates]
        self.longest = max((g.words for g in eraser.gates), default=1)
        self.cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.busy = False  # re-encoding inside the hook must not be edited again

    def _stop(self, row: list[int]) -> int:
        """The position of a prompt's final end-of-text token: the one after its last token
        that is neither end-of-text nor padding (its length if it has none). Not the first:
        an end-of-text token typed inside a prompt ("a photo of <|endoftext|> alice") would
        hide the words after it from the check, while the text encoder and the U-Net still
        read them."""
        last = next((i for i in range(len(row) - 1, 0, -1) if row[i] not in self.tail), 0)
        return min(last + 1, len(row))

    def runs(self, row: list[int]) -> list[tuple[int, int]]:
        """(start, stop) token positions of every run of 1..longest words of a prompt."""
        stop = self._stop(row)
        n = len(self.word_end)  # a token added after install (a textual inversion's) is a word
        ends = [
            i + 1 for i in range(1, stop) if row[i] >= n or self.word_end[row[i]] or i == stop - 1
        ]
        starts = [1, *ends[:-1]]
        return [
            (starts[a], ends[b])
            for a in range(len(ends))
            for b in range(a, min(a + self.longest, len(ends)))
        ]

    def _encode(self, rows: list[list[int]], length: int, device) -> torch.Tensor:
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        for k, r in enumerate(rows):
            r = [*r[: length - 1], self.end] if len(r) > length else r
            ids[k, : len(r)] = torch.tensor(r)
        self.busy = True
        try:
            with torch.no_grad():
                return self.text_encoder(ids.to(device))[0]
        finally:
            self.busy = False

    def check(self, spans: list[tuple[int, ...]], device) -> torch.Tensor:
        """[S, C] each gate's reach on each run of words, alone in the gate's template."""
        todo = [(t, s) for s in dict.fromkeys(spans) for t in self.templates
                if (t, s) not in self.cache]  # fmt: skip
        known = len(self.word_end)  # a token added after install may still be training
        fresh: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        for template in {t for t, _ in todo}:
            before, after = self.templates[template]
            mine = [s for t, s in todo if t == template]
            rows = [[self.start, *before, *s, *after, self.end] for s in mine]
            states = self._encode(rows, max(map(len, rows)) + 1, device)
            at = 1 + len(before)  # the word's first token; its states run to one pad after
            reach = self.eraser.reach(states[:, at:], template).cpu()
            fresh.update({(template, s): r for s, r in zip(mine, reach, strict=True)})
        if len(self.cache) + len(fresh) > _CACHE:
            self.cache.clear()
        self.cache.update({k: r for k, r in fresh.items() if max(k[1]) < known})
        out = torch.zeros(len(spans), len(self.eraser.gates))
        for i, s in enumerate(spans):  # a gate reads 0 in every template but its own
            for t in self.templates:
                out[i] = torch.maximum(out[i], fresh.get((t, s), self.cache.get((t, s))))
        return out

    def edit(self, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`states` of prompts `ids` with every fired run of words replaced by its anchor
        (blended by the gate's reach) and encoded again; rows without one are untouched."""
        rows = ids.tolist()
        runs = [self.runs(r) for r in rows]
        spans = [tuple(r[a:b]) for r, rs in zip(rows, runs, strict=True) for a, b in rs]
        reach = self.check(spans, states.device)
        new, blend, pairs, push, k = {}, {}, {}, {}, 0
        for b, (r, rs) in enumerate(zip(rows, runs, strict=True)):
            hits = []
            for a, e in rs:
                j = int(reach[k].argmax())
                if reach[k, j] > 0:
                    lead = self.leads[j]
                    if lead and a > len(lead) and r[a - len(lead) : a] == lead:
                        a -= len(lead)  # dropped with the word
                    hits.append((float(reach[k, j]), e - a, a, e, j))
                k += 1
            if not hits:
                continue
            taken: list[tuple[int, int, int]] = []
            for _, _, a, e, j in sorted(hits, reverse=True):  # strongest, then longest
                if all(e <= a2 or a >= e2 for a2, e2, _ in taken):
                    taken.append((a, e, j))
            words = [(a, e, self._words(j)) for a, e, j in sorted(taken)]
            new[b], pairs[b] = self._rewrite(r, words, states.shape[1])
            blend[b] = max(h[0] for h in hits)
            replaced = any(self.anchors[j] for *_, j in taken)  # else every word dropped
            push[b] = self.eraser.overshoot if replaced else self.eraser.dropped
            if any(self.routes[j] for *_, j in taken):
                push[b] = 0.0  # a guide is drawn as its own words draw it
        if not new:
            return states
        enc = self._encode(list(new.values()), states.shape[1], states.device)
        out = states.clone()
        for (b, r), x in zip(blend.items(), enc, strict=True):
            s, x, g = states[b].float(), x.float(), push[b]
            if g:  # past the anchor, away from the concept, where the two prompts align
                to, at = (torch.tensor(i) for i in zip(*pairs[b], strict=True))
                x = x.clone()
                x[to] += g * (x[to] - s[at])
            out[b] = (s + r * (x - s)).to(states.dtype)
        return out

    def _words(self, j: int) -> list[int]:
        """The ids a fired word of gate j becomes: its anchor's (none: dropped), or for a
        route the next guide's."""
        if not self.routes[j]:
            return self.anchors[j]
        self.turns[j] += 1  # per route: another route's words do not skip its turn
        return self.routes[j][(self.turns[j] - 1) % len(self.routes[j])]

    def _rewrite(self, row: list[int], taken: list[tuple[int, int, list[int]]], length: int):
        """(the prompt's ids with each taken run (start, stop, its new ids) replaced by
        those ids (none: dropped), [(new position, old position)] of the tokens the two
        share: every token outside the runs, each new run's last token for its run's last,
        and the end-of-text token and the pads after it)."""
        stop = self._stop(row)
        out: list[int] = []
        pairs: list[tuple[int, int]] = []
        last = 0
        for a, e, ids in [*taken, (stop, stop, [])]:
            pairs += [(len(out) + k, i) for k, i in enumerate(range(last, a))]
            out += row[last:a]
            if ids:
                out += ids
                pairs.append((len(out) - 1, e - 1))
            last = e
        shift = len(out) - stop
        pairs += [(i + shift, i) for i in range(stop, length) if 0 <= i + shift < length]
        return [*out, self.end], pairs


# ---- robust mode: only the base vocabulary's words --------------------------------------


class VocabularyLock:
    """Robust mode's hooks. Before the text encoder runs, every token that is not a base
    word with its install-time row becomes the base word whose embedding is nearest to its
    own, so the eraser's word check sees real words; in the embeddings module (token +
    position), every token is read with its install-time row, and a replaced token's own
    embedding stays in the graph at zero value (straight-through: its gradient is the
    nearest word's)."""

    def __init__(self, text_encoder, vocab_size: int):
        self.module = next(
            (m for m in text_encoder.modules()
             if hasattr(m, "token_embedding") and hasattr(m, "position_embedding")),
            None,
        )  # fmt: skip
        if self.module is None:
            raise EraserError("robust mode needs a CLIP-style text encoder (token_embedding)")
        self.rows = self.module.token_embedding.weight[:vocab_size].detach().clone()
        self.sq = self.rows.float().pow(2).sum(1)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (embeddings, replaced)

    def _base(self, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.rows.to(like.device, like.dtype)[ids.clamp(max=len(self.rows) - 1)]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """[N] the base word whose embedding is nearest to each of x [N, D]."""
        x = x.detach().float()
        d2 = self.sq.to(x.device) - 2 * x @ self.rows.to(x.device).float().T
        return d2.argmin(1)

    def before(self, module, args, kwargs):
        """Pre-hook of the text encoder: the ids it reads, each a base word."""
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return None
        tok = self.module.token_embedding(ids)
        foreign = (ids >= len(self.rows)) | (tok != self._base(ids, tok)).any(-1)
        if not bool(foreign.any()):
            return None
        words = ids.clone()
        words[foreign] = self.nearest(tok[foreign]).to(ids.device)
        self.pending = (tok, foreign)
        if args:
            return (words, *args[1:]), kwargs
        return args, kwargs | {"input_ids": words}

    def after(self, module, args, kwargs, output):
        """Forward hook of the embeddings module: base rows, and the straight-through term."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return output
        tok = module.token_embedding(ids)
        out = output + (self._base(ids, tok) - tok).detach()  # rows changed since install
        if self.pending is not None:
            learned, foreign = self.pending
            self.pending = None
            if learned.shape == tok.shape and learned.requires_grad:
                out = out + (learned - learned.detach()) * foreign[..., None]
        return out


# ---- installing it on a pipeline -----------------------------------------------------

# text encoder -> (hook handles, eraser, robust mode's lock or None)
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install(pipe, eraser: Eraser) -> None:
    """Apply `eraser` to every prompt `pipe` encodes from now on."""
    one_text_encoder(pipe)
    if pipe.text_encoder in _HOOKS:
        raise EraserError("this pipeline already has an eraser installed; remove it first")
    handles, lock = [], None
    if eraser.lock:
        lock = VocabularyLock(pipe.text_encoder, pipe.tokenizer.vocab_size)
        handles.append(pipe.text_encoder.register_forward_pre_hook(lock.before, with_kwargs=True))
        handles.append(lock.module.register_forward_hook(lock.after, with_kwargs=True))
    words = WordCheck(eraser, pipe.tokenizer, pipe.text_encoder)

    def hook(module, args, kwargs, output):
        if words.busy:
            return output
        ids = args[0] if args else kwargs.get("input_ids")
        states = output.last_hidden_state if ids is None else words.edit(output[0], ids)
        output.last_hidden_state = eraser.edit(states)
        return output

    handles.append(pipe.text_encoder.register_forward_hook(hook, with_kwargs=True))
    _HOOKS[pipe.text_encoder] = (handles, eraser, lock)


def one_text_encoder(pipe) -> None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise EraserError(
            "gated erasure supports one text encoder (SD 1.x / 2.x), not SDXL's two; "
            "use erase: resteer for this model"
        )


def remove(pipe) -> None:
    """Take the installed eraser off `pipe` (nothing if none is)."""
    handles, _, _ = _HOOKS.pop(pipe.text_encoder, ((), None, None))
    for handle in handles:
        handle.remove()


def installed(pipe) -> bool:
    return installed_eraser(pipe) is not None


def installed_eraser(pipe) -> Eraser | None:
    text_encoder = getattr(pipe, "text_encoder", None)
    return _HOOKS.get(text_encoder, (None, None, None))[1] if text_encoder is not None else None


def read_as(pipe, vectors: torch.Tensor) -> str | None:
    """The base words robust mode reads token embeddings `vectors` [n, D] as, one per
    vector (what an attacker's learned tokens really say to the model); None where the
    pipeline has no locked eraser installed."""
    text_encoder = getattr(pipe, "text_encoder", None)
    lock = _HOOKS.get(text_encoder, (None, None, None))[2] if text_encoder is not None else None
    if lock is None:
        return None
    ids = lock.nearest(vectors.to(lock.rows.device)).tolist()
    return " ".join(pipe.tokenizer.convert_ids_to_tokens(ids))


@contextmanager
def applied(pipe, eraser: Eraser | None) -> Iterator[None]:
    """`pipe` with `eraser` installed inside the block (None: unchanged)."""
    if eraser is None:
        yield
        return
    install(pipe, eraser)
    try:
        yield
    finally:
        remove(pipe)


# ---- file ------------------------------------------------------------------------------


def save(eraser: Eraser, path: Path | str) -> Path:
    """Write the eraser to one safetensors file (atomically)."""
    from safetensors.torch import save_file

    from fmn.io import atomic_path

    tensors = eraser.tensors()
    meta = {
        "format": str(FORMAT),
        "gates": json.dumps([g.meta() for g in eraser.gates]),
        "config": json.dumps(eraser.config, sort_keys=True),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load(path: Path | str) -> Eraser:
    """Read an eraser file written by `save`; any other file is refused by name."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") not in READS:
                raise EraserError(
                    f"{path}: not an eraser file of format {' or '.join(READS)} (metadata {meta})"
                )
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        gates = [
            ConceptGate(
                g["id"],
                t[f"{j}.prototypes"],
                float(t[f"{j}.radius"][0]),
                g["nearest"],
                t[f"{j}.down"],
                t[f"{j}.up"],
                g["anchor"],
                g["template"],
                g["words"],
                g["lead"],
                g["near"],
                [tuple(x) for x in g["similar"]],
                g.get("guides", []),
            )
            for j, g in enumerate(json.loads(meta["gates"]))
        ]
        config = json.loads(meta["config"])
        overshoot, dropped = t["overshoot"].tolist()
        return Eraser(t["mean"], t["whiten"], gates, float(t["soft"][0]), config, overshoot,
                      dropped, "lock" in t)  # fmt: skip
    except EraserError:
        raise
    except Exception as e:  # safetensors' own error, a missing file, a missing tensor or key
        raise EraserError(f"{path}: cannot read the eraser file ({type(e).__name__}: {e})") from e
