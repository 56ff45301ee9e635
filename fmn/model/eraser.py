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
- the radius is `RADIUS_SHARE` of the distance from the prototypes to the nearest state of
  any other prompt it is checked against: every whole word of the tokenizer in the type's
  first two templates ("a photo of {w}"), the generic anchor prompts and the manifest's
  preserved concepts. So no such prompt can fire the gate; prompts that never come near a
  target pass through unchanged;
- a fired prompt's states (every position after the start token) go through x -> x + x D U,
  a low-rank map fitted (ridge) to send the concept's states from its last token on to the
  anchor prompt's ("a person" in the same template), aligned from the end, and the
  template's words before the concept to themselves.

Nothing here reads an image or a detector. The gate sits on the text encoder's output (a
forward hook), so it acts on whatever reads the text states; SD 1.x / 2.x pipelines (one
text encoder, no clip-skip). It is stored as one safetensors file and installed by
`fmn.model.load.load_pipeline` when a model folder carries it.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fmn.data.anchors import anchor_prompts
from fmn.model.conditioning import CONCEPT_TEMPLATES, token_ids, whole_words

ERASER_FILE = "eraser.safetensors"
FORMAT = 1
# The gate's reach as a share of the distance to the nearest other prompt, and how soft
# its edge is (full at (1 - SOFT) * radius, nothing at radius). Chosen on tune concepts
# only (docs/mass.md "Gated erasure").
RADIUS_SHARE = 0.5
SOFT = 0.5
MAP_RANK = 32  # the map's rank; the fitted map's spectrum falls off well before
MAP_RIDGE = 1e-3  # relative to the mean squared state norm
WHITEN_RIDGE = 1e-4  # relative to the mean variance: directions no prompt spans count little


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


@dataclass
class Eraser:
    """Gates and maps of several concepts over one text encoder."""

    mean: torch.Tensor  # [D]
    whiten: torch.Tensor  # [D, D]
    gates: list[ConceptGate]
    soft: float = SOFT
    config: dict = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return [g.id for g in self.gates]

    def fired(self, states: torch.Tensor) -> torch.Tensor:
        """[B, C]: how strongly each concept's gate fires on each prompt (0..1)."""
        w = (states[:, 1:].float() - self.mean) @ self.whiten
        out = torch.zeros(states.shape[0], len(self.gates))
        for j, g in enumerate(self.gates):
            d = torch.cdist(w, g.prototypes.expand(len(w), -1, -1)).amin(-1)  # [B, T-1]
            reach = ((g.radius - d) / (self.soft * g.radius)).clamp(0, 1)
            out[:, j] = reach.amax(-1)
        return out

    def edit(self, states: torch.Tensor) -> torch.Tensor:
        """The states with every fired concept's map applied (unfired prompts unchanged)."""
        fire = self.fired(states)
        if not bool((fire > 0).any()):
            return states
        x = states[:, 1:].float()
        dx = torch.zeros_like(x)
        for j, g in enumerate(self.gates):
            if bool((fire[:, j] > 0).any()):
                dx += fire[:, j, None, None] * ((x @ g.down) @ g.up)
        out = states.clone()
        out[:, 1:] = (x + dx).to(states.dtype)
        return out

    def merged_with(self, other: Eraser) -> Eraser:
        if not torch.equal(self.whiten, other.whiten):
            raise EraserError("erasers fitted on different text encoders cannot be merged")
        return Eraser(self.mean, self.whiten, self.gates + other.gates, self.soft, self.config)


# ---- installing it on a pipeline -----------------------------------------------------

_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text encoder -> handle


def install(pipe, eraser: Eraser) -> None:
    """Apply `eraser` to every prompt `pipe` encodes from now on."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise EraserError("gated erasure supports one text encoder (SD 1.x / 2.x), not SDXL")
    if pipe.text_encoder in _HOOKS:
        raise EraserError("this pipeline already has an eraser installed; remove it first")

    def hook(module, args, output):
        output.last_hidden_state = eraser.edit(output.last_hidden_state)
        return output

    _HOOKS[pipe.text_encoder] = pipe.text_encoder.register_forward_hook(hook)


def remove(pipe) -> None:
    handle = _HOOKS.pop(pipe.text_encoder, None)
    if handle is not None:
        handle.remove()


def installed(pipe) -> bool:
    return pipe.text_encoder in _HOOKS


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


# ---- fitting ---------------------------------------------------------------------------


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


_VOCAB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text encoder -> negatives


def vocabulary_states(pipe, kind: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(words, [N, D] states, [N] word index) of "template {w}" for every whole word of the
    tokenizer in the type's first two templates: the states from the word on (the word,
    the end-of-text token and one pad after it), and the template's own words once (word
    index -1). Computed once per text encoder and type."""
    mine = _VOCAB.setdefault(pipe.text_encoder, {})
    if kind in mine:
        return mine[kind]
    words = list(whole_words(pipe.tokenizer))
    states, owner = [], []
    for template in CONCEPT_TEMPLATES[kind][:2]:
        prompts = [template.format(w) for w in words]
        lens = _lengths(pipe, prompts)
        enc = _encode(pipe, prompts, length=max(lens) + 1)
        at = _lengths(pipe, [template.split("{}")[0].strip()])[0] - 1  # the word's position
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


def _nearest(points: torch.Tensor, prototypes: torch.Tensor, chunk: int = 65536) -> float:
    """Smallest distance from any of `points` to any prototype."""
    best = float("inf")
    for i in range(0, len(points), chunk):
        best = min(best, torch.cdist(points[i : i + chunk], prototypes).min().item())
    return best


def _prompt_states(pipe, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's states from its first word to one pad after its end-of-text token."""
    lens = _lengths(pipe, prompts)
    enc = _encode(pipe, prompts, length=max(lens) + 1)
    return [enc[k, 1 : n + 1] for k, n in enumerate(lens)]


def _map(pipe, prompts: list[str], anchor_prompts_: list[str], prefix: list[int], rank: int):
    """(down [D, r], up [r, D]): a ridge fit of x -> x M sending each prompt's states from
    its last token on to its anchor prompt's (aligned from there, the longer cut), and the
    template words before the concept (positions 1 .. prefix-1) to themselves."""
    old, new = _encode(pipe, prompts), _encode(pipe, anchor_prompts_)
    lo, ln = _lengths(pipe, prompts), _lengths(pipe, anchor_prompts_)
    xs, ys = [], []
    for k in range(len(prompts)):
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
    progress=None,
) -> Eraser:
    """An eraser for `concepts` ((id, type, phrasings) each) on `pipe`'s text encoder.
    anchors: anchor text per concept id (others: their type's, ERASE_ANCHORS); preserve:
    (text, type) of concepts the gates must never fire on (their prompts join the checked
    prompts). progress(label, done, total) is called per concept."""
    from fmn.data.anchors import ERASE_ANCHORS

    if installed(pipe):
        raise EraserError("fit an eraser on the base model, without an eraser installed")
    bad = [t for _, k, _ in concepts for t in CONCEPT_TEMPLATES[k] if not t.endswith("{}")]
    if bad:  # the map's alignment starts at the prompt's last concept token
        raise EraserError(f"templates must end with the concept: {bad}")
    kinds = sorted({k for _, k, _ in concepts})
    vocab = {k: vocabulary_states(pipe, k) for k in kinds}
    mean, whiten = _whitening(torch.cat([v[1] for v in vocab.values()]))

    def white(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) @ whiten

    gates = []
    for n, (cid, kind, words) in enumerate(concepts):
        if progress:
            progress(f"gate {cid}", n, len(concepts))
        words = [words] if isinstance(words, str) else list(words)
        templates = CONCEPT_TEMPLATES[kind]
        prompts = [t.format(w) for t in templates for w in words]
        lens = _lengths(pipe, prompts)
        enc = _encode(pipe, prompts, length=max(lens) + 1)
        protos = white(torch.cat([enc[k, n_ - 2 : n_] for k, n_ in enumerate(lens)]))
        names, states, owner = vocab[kind]
        own = torch.tensor([i for i, w in enumerate(names) if w in {x.lower() for x in words}])
        others = states[~torch.isin(owner, own)] if len(own) else states
        checked = anchor_prompts(set(words), preserve=list(preserve))
        extra = torch.cat(_prompt_states(pipe, checked))
        nearest = min(_nearest(white(others), protos), _nearest(white(extra), protos))
        anchor = (anchors or {}).get(cid, ERASE_ANCHORS[kind])
        paired = [t.format(anchor) for t in templates for _ in words]
        prefix = [
            _lengths(pipe, [t.split("{}")[0].strip()])[0] - 1 for t in templates for _ in words
        ]
        down, up = _map(pipe, prompts, paired, prefix, rank)
        gates.append(ConceptGate(cid, protos, radius_share * nearest, nearest, down, up))
    if progress:
        progress("gates", len(concepts), len(concepts))
    config = {"radius_share": radius_share, "soft": soft, "rank": rank, "anchors": anchors or {}}
    return Eraser(mean, whiten, gates, soft, config)


# ---- file ------------------------------------------------------------------------------


def save(eraser: Eraser, path: Path | str) -> Path:
    """Write the eraser to one safetensors file (atomically)."""
    from safetensors.torch import save_file

    from fmn.io import atomic_path

    tensors = {"mean": eraser.mean, "whiten": eraser.whiten}
    for j, g in enumerate(eraser.gates):
        tensors |= {f"{j}.prototypes": g.prototypes, f"{j}.down": g.down, f"{j}.up": g.up}
    meta = {
        "format": str(FORMAT),
        "soft": repr(eraser.soft),
        "gates": json.dumps(
            [{"id": g.id, "radius": g.radius, "nearest": g.nearest} for g in eraser.gates]
        ),
        "config": json.dumps(eraser.config, sort_keys=True),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def load(path: Path | str) -> Eraser:
    """Read an eraser file written by `save`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(FORMAT):
                raise EraserError(
                    f"{path}: not an eraser file of format {FORMAT} (metadata {meta})"
                )
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (OSError, RuntimeError) as e:
        raise EraserError(f"{path}: cannot read the eraser file ({e})") from e
    gates = [
        ConceptGate(
            g["id"], t[f"{j}.prototypes"], g["radius"], g["nearest"], t[f"{j}.down"], t[f"{j}.up"]
        )
        for j, g in enumerate(json.loads(meta["gates"]))
    ]
    return Eraser(t["mean"], t["whiten"], gates, float(meta["soft"]), json.loads(meta["config"]))
