"""Fitting the gated concepts' text-state eraser (fmn.model.eraser explains what it does): the
concepts' prototypes and radii from the text encoder and the tokenizer's vocabulary, and
their maps to their anchors. Reads no image and no detector."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from fmn.data.anchors import ERASE_ANCHORS, GATE_DROPS, anchor_prompts
from fmn.manifest import ResolvedConcept
from fmn.model.conditioning import CONCEPT_TEMPLATES, concept_prompts, token_ids, whole_words
from fmn.model.eraser import ConceptGate, Eraser, EraserError, installed, one_text_encoder
from fmn.model.load import fingerprint
from fmn.progress import Progress

# The gate's reach as a share of the distance to the nearest other prompt, and how soft
# its edge is (full at (1 - SOFT) * radius, nothing at radius). Chosen on tune identities
# only (docs/mass.md "Gated erasure").
RADIUS_SHARE = 0.5
SOFT = 0.5
# How far past its anchor a replaced word's states go, away from the concept's (ESD's
# negative guidance, half a step): chosen on tune objects and styles, where the anchors are
# words the world never learned and draw some targets themselves, and where a whole step
# also harmed objects drawn in a removed style (docs/mass.md).
OVERSHOOT = 0.5
# The same for a prompt whose gated word was dropped (a style: fmn.data.anchors.GATE_DROPS),
# past the prompt without it: chosen on tune styles and tune objects drawn in them (docs/
# mass.md); no push left a tune style drawn on some seeds, half a step harmed the objects.
DROPPED_OVERSHOOT = 0.25
MAP_RANK = 32  # the map's rank: one concept's prompts span few directions
MAP_RIDGE = 1e-3  # relative to the mean squared state norm
WHITEN_RIDGE = 1e-4  # relative to the mean variance: directions no prompt spans count little
# A kept prompt this close (whitened) to a concept's states reads the same as the concept
# (the same words, up to float error): no radius can keep it out.
MIN_NEAREST = 1e-3


def guide_words(prompts: Sequence[str], kind: str) -> list[str]:
    """A correction's guide prompts as the words its route puts in place of the concept's:
    each prompt without its type's template ("a photo of john" -> "john"), or whole where
    no template of the type fits it."""
    out = []
    for p in prompts:
        for t in CONCEPT_TEMPLATES[kind]:
            before, after = t.split("{}")
            if p.startswith(before) and p.endswith(after) and len(p) > len(before) + len(after):
                p = p[len(before) : len(p) - len(after)]
                break
        out.append(p.strip())
    return out


def gated_inputs(
    resolved: Sequence[ResolvedConcept],
) -> tuple[list[tuple[str, str, tuple[str, ...]]], dict[str, list[str]]]:
    """(concepts, guides) for `fit` from resolved concepts (fmn.manifest.ResolvedConcept)
    whose `erase` is gate: (id, type, words) each, and the corrected ones' guide words."""
    concepts = [(r.id, r.type, r.words) for r in resolved]
    routes = {r.id: guide_words(r.guide_prompts, r.type) for r in resolved if r.action == "correct"}
    return concepts, routes


def _similar(pipe, cid, kind, words, vocab, white_states, white, anchor):
    """The vocabulary words the base model draws like the concept (fmn.merge.similar)."""
    from fmn.merge.similar import nearest_words, similar_words

    prompts = concept_prompts(words, kind)
    lens = _lengths(pipe, prompts)
    enc = _encode(pipe, prompts)
    protos = white(torch.cat([enc[k, n - 2 : n] for k, n in enumerate(lens)]))
    near = nearest_words(vocab[0], white_states, vocab[2], protos, skip=words)
    return similar_words(pipe, kind, words, near, anchor=anchor)


def _lengths(pipe, prompts: Sequence[str]) -> list[int]:
    """Each prompt's token count, start and end-of-text tokens included."""
    return [len(i) for i in pipe.tokenizer(list(prompts)).input_ids]


@torch.no_grad()
def _encode(pipe, prompts: Sequence[str], length: int | None = None, batch: int = 256):
    """[P, T, D] last hidden states. `length`: pad or cut to this many tokens (a state does
    not depend on the tokens after it: CLIP's text encoder is causal)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    out = []
    for i in range(0, len(prompts), batch):
        ids = token_ids(tok, list(prompts[i : i + batch]), length)
        out.append(te(ids.to(te.device))[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _encode_ids(pipe, ids: list[list[int]], length: int, batch: int = 256) -> torch.Tensor:
    """[P, length, D] last hidden states of token ids (start and end included), padded as
    the tokenizer pads; the same as `_encode` of their prompts, without tokenising again."""
    te, pad = pipe.text_encoder, pipe.tokenizer.pad_token_id
    out = []
    for i in range(0, len(ids), batch):
        rows = torch.full((len(ids[i : i + batch]), length), pad, dtype=torch.long)
        for k, r in enumerate(ids[i : i + batch]):
            rows[k, : len(r)] = torch.tensor(r[:length])
        out.append(te(rows.to(te.device))[0].float().cpu())
    return torch.cat(out)


def _words(pipe, text: str) -> int:
    """How many words the tokenizer sees in `text` (its tokens that end a word)."""
    ids = pipe.tokenizer(text, add_special_tokens=False).input_ids
    ends = pipe.tokenizer.convert_ids_to_tokens(ids)
    return max(1, sum(t.endswith("</w>") for t in ends))


def _word_position(pipe, template: str) -> int:
    """The position of the first token `{}` stands for in `template` (start token = 0)."""
    return _lengths(pipe, [template.split("{}")[0].strip()])[0] - 1


_VOCAB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text encoder -> negatives


def vocabulary_states(pipe, kind: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(words, [N, D] states, [N] word index) of "template {w}" for every whole word of the
    tokenizer in the type's first two templates: the states from the word on (the word,
    the end-of-text token and one pad after it), and the template's own words once (word
    index -1). Computed once per text encoder and type. (The closed loop's watch list,
    fmn.train.loop.vocabulary_states, keeps one template's name and end-of-text states
    per word; the gate's radius needs every state a prompt of the word can show.)"""
    mine = _VOCAB.setdefault(pipe.text_encoder, {})
    if kind in mine:
        return mine[kind]
    words = list(whole_words(pipe.tokenizer))
    states, owner = [], []
    for template in CONCEPT_TEMPLATES[kind][:2]:
        ids = pipe.tokenizer([template.format(w) for w in words]).input_ids  # tokenised once
        lens = [len(i) for i in ids]
        enc = _encode_ids(pipe, ids, max(lens) + 1)
        at = _word_position(pipe, template)
        states.append(enc[0, 1:at])  # the template's words: the same before every word
        owner += [-1] * (at - 1)
        for k, n in enumerate(lens):
            states.append(enc[k, at : n + 1])
            owner += [k] * (n + 1 - at)
    mine[kind] = (words, torch.cat(states), torch.tensor(owner))
    return mine[kind]


def _whitening(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = states.mean(0)
    x = states - mean
    cov = x.T @ x / len(x)
    eye = torch.eye(cov.shape[0])
    ev, vecs = torch.linalg.eigh(cov + WHITEN_RIDGE * cov.diagonal().mean() * eye)
    return mean, vecs @ torch.diag(ev.rsqrt()) @ vecs.T


def _nearest(
    points: torch.Tensor, prototypes: torch.Tensor, skip=None, sq=None
) -> tuple[float, int]:
    """(smallest distance, its row) from any of `points` (but the rows in `skip`) to any
    prototype, as |x|^2 - 2 x.p + |p|^2 (sq: the points' |x|^2 if known): one matrix
    product, and the points are never copied."""
    sq = points.pow(2).sum(1, keepdim=True) if sq is None else sq
    d2 = sq - 2 * points @ prototypes.T + prototypes.pow(2).sum(1)
    if skip is not None:
        d2[skip] = float("inf")
    best = d2.min(1).values
    row = int(best.argmin())
    return best[row].clamp_min(0).sqrt().item(), row


def _prompt_states(pipe, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's states from its first word to one pad after its end-of-text token."""
    lens = _lengths(pipe, prompts)
    enc = _encode(pipe, prompts, length=max(lens) + 1)
    return [enc[k, 1 : n + 1] for k, n in enumerate(lens)]


def _map(pipe, old: torch.Tensor, lo: list[int], anchor_prompts_: list[str], prefix: list[int],
         rank: int):  # fmt: skip
    """(down [D, r], up [r, D]): a ridge fit of x -> x M sending each concept prompt's
    states (`old`, full length; `lo` their token counts) from its last token on to its
    anchor prompt's (aligned from there, the longer cut), and the template words before
    the concept (positions 1 .. prefix-1) to themselves."""
    new, ln = _encode(pipe, anchor_prompts_), _lengths(pipe, anchor_prompts_)
    xs, ys = [], []
    for k in range(len(lo)):
        i, j = lo[k] - 2, ln[k] - 2  # the last concept token (templates end with it)
        far, length = max(i, j), old.shape[1]
        x, y = old[k, i : length - (far - i)], new[k, j : length - (far - j)]
        xs += [old[k, 1 : prefix[k]], x]
        ys += [torch.zeros_like(old[k, 1 : prefix[k]]), y - x]
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    ridge = MAP_RIDGE * x.pow(2).sum(1).mean()
    m = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    u, s, vh = torch.linalg.svd(m)
    r = min(rank, int((s > s[0] * 1e-6).sum()))
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def fit(
    pipe,
    concepts: Sequence[tuple[str, str, Sequence[str]]],
    *,
    anchors: dict[str, str] | None = None,
    preserve: Sequence[tuple[str, str]] = (),
    radius_share: float = RADIUS_SHARE,
    soft: float = SOFT,
    rank: int = MAP_RANK,
    overshoot: float = OVERSHOOT,
    dropped_overshoot: float = DROPPED_OVERSHOOT,
    templates: int | None = None,
    drops: dict[str, str] | None = None,
    widen: Sequence[str] = (),
    guides: dict[str, Sequence[str]] | None = None,
    lock: bool = False,
    progress: Progress | None = None,
) -> Eraser:
    """An eraser for `concepts` ((id, type, phrasings) each) on `pipe`'s text encoder.
    anchors: anchor text per concept id (others: their type's, ERASE_ANCHORS); preserve:
    (text, type) of concepts the gates must never fire on (their prompts join the checked
    prompts). templates: fit on the first this many of each type's templates (default:
    all). drops: per type, the lead-in words a fired word is dropped with (default
    GATE_DROPS; a concept named in `anchors` is replaced by its anchor instead). widen:
    ids of concepts whose gates also take the vocabulary words the base model draws like
    them (fmn.merge.similar; this draws images). guides: per corrected concept id, its
    guide's words (`guide_words`): its gate is a route, replacing a fired word by each in
    turn. lock: robust mode (fmn.model.eraser.VocabularyLock: every token is read as a
    word of the base vocabulary). progress(label, done, total) is called per concept."""
    one_text_encoder(pipe)
    drops = GATE_DROPS if drops is None else drops
    if installed(pipe):
        raise EraserError("fit an eraser on the base model, without an eraser installed")
    bad = [t for _, k, _ in concepts for t in CONCEPT_TEMPLATES[k] if not t.endswith("{}")]
    if bad:  # the map's alignment starts at the prompt's last concept token
        raise EraserError(f"templates must end with the concept: {bad}")
    kinds = sorted({k for _, k, _ in concepts})
    if progress:
        progress("vocabulary states", 0, len(concepts))  # once per text encoder and type
    vocab = {k: vocabulary_states(pipe, k) for k in kinds}
    mean, whiten = _whitening(torch.cat([v[1] for v in vocab.values()]))

    def white(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) @ whiten

    white_vocab = {k: white(v[1]) for k, v in vocab.items()}  # once: the costly product
    square = {k: v.pow(2).sum(1, keepdim=True) for k, v in white_vocab.items()}
    checked: dict[str, torch.Tensor] = {}  # prompt -> whitened states, encoded once

    def checked_states(prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        new = [p for p in dict.fromkeys(prompts) if p not in checked]
        if new:
            checked.update(zip(new, map(white, _prompt_states(pipe, new)), strict=True))
        rows = [checked[p] for p in prompts]
        return torch.cat(rows), [p for p, r in zip(prompts, rows, strict=True) for _ in r]

    index = {k: {w: i for i, w in enumerate(v[0])} for k, v in vocab.items()}
    gates = []
    for n, (cid, kind, words) in enumerate(concepts):
        if progress:
            progress(f"gate {cid}", n, len(concepts))
        words = [words] if isinstance(words, str) else list(words)
        found: list[tuple[str, float]] = []
        if cid in widen:
            found = _similar(pipe, cid, kind, words, vocab[kind], white_vocab[kind], white,
                             (anchors or {}).get(cid))  # fmt: skip
            words += [w for w, _ in found]
        used = CONCEPT_TEMPLATES[kind][:templates]
        prompts = concept_prompts(words, kind)[: len(used) * len(words)]  # template-major
        lens = _lengths(pipe, prompts)
        enc = _encode(pipe, prompts)
        protos = white(torch.cat([enc[k, n_ - 2 : n_] for k, n_ in enumerate(lens)]))
        own = [index[kind][w.lower()] for w in words if w.lower() in index[kind]]
        mine = torch.isin(vocab[kind][2], torch.tensor(own)) if own else None  # not "others"
        extra, said = checked_states(anchor_prompts(set(words), preserve=list(preserve)))
        (d_vocab, i_vocab), (d_extra, i_extra) = (
            _nearest(white_vocab[kind], protos, mine, square[kind]), _nearest(extra, protos)
        )  # fmt: skip
        if d_vocab <= d_extra:
            k = int(vocab[kind][2][i_vocab])
            near = repr(vocab[kind][0][k]) if k >= 0 else "its template's own words"
            hint = "list that word among its words if it means the concept, or re-steer it"
        else:
            near = repr(said[i_extra])
            hint = "drop that concept from preserve, or forget both"
        nearest = min(d_vocab, d_extra)
        if nearest < MIN_NEAREST:
            raise EraserError(
                f"{cid!r} cannot be gated: its prompts read the same as {near} (distance "
                f"{nearest:.2g}), so any gate on it would erase that too (hint: {hint})"
            )
        route = list((guides or {}).get(cid, ()))
        anchor = route[0] if route else (anchors or {}).get(cid, ERASE_ANCHORS[kind])
        lead = None if route or cid in (anchors or {}) else drops.get(kind)
        if route:  # a route acts on words only: one linear map cannot pick a guide per prompt
            down, up = torch.zeros(enc.shape[-1], 1), torch.zeros(1, enc.shape[-1])
        else:
            paired = [t.format(anchor) for t in used for _ in words]
            prefix = [_word_position(pipe, t) for t in used for _ in words]
            down, up = _map(pipe, enc, lens, paired, prefix, rank)
        longest = max(_words(pipe, w) for w in words)
        gates.append(
            ConceptGate(cid, protos, radius_share * nearest, nearest, down, up,
                        anchor, CONCEPT_TEMPLATES[kind][0], longest, lead, near, found, route)
        )  # fmt: skip
    if progress:
        progress("gates", len(concepts), len(concepts))
    config = {
        "radius_share": radius_share,
        "soft": soft,
        "rank": rank,
        "overshoot": overshoot,
        "dropped_overshoot": dropped_overshoot,
        "templates": templates,
        "anchors": anchors or {},
        "drops": drops,
        "widen": sorted(widen),
        "guides": {k: list(v) for k, v in (guides or {}).items()},
        "lock": lock,
        "base_fingerprint": fingerprint(pipe),  # the model it was fitted on
    }
    return Eraser(mean, whiten, gates, soft, config, overshoot, dropped_overshoot, lock)
