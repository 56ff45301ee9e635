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
  template's words before the concept to themselves.

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
FORMAT = 1


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
    soft: float  # the gate's edge: full within (1 - soft) * radius, nothing beyond radius
    config: dict = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return [g.id for g in self.gates]

    def fired(self, states: torch.Tensor) -> torch.Tensor:
        """[B, C]: how strongly each concept's gate fires on each prompt (0..1)."""
        dev = states.device
        w = (states[:, 1:].float() - self.mean.to(dev)) @ self.whiten.to(dev)
        out = torch.zeros(states.shape[0], len(self.gates), device=dev)
        for j, g in enumerate(self.gates):
            protos = g.prototypes.to(dev).expand(len(w), -1, -1)
            d = torch.cdist(w, protos).amin(-1)  # [B, T-1]
            reach = ((g.radius - d) / (self.soft * g.radius)).clamp(0, 1)
            out[:, j] = reach.amax(-1)
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
        for j, g in enumerate(self.gates):
            out |= {f"{j}.prototypes": g.prototypes, f"{j}.down": g.down, f"{j}.up": g.up}
            out[f"{j}.radius"] = torch.tensor([g.radius], dtype=torch.float64)
        return out


# ---- installing it on a pipeline -----------------------------------------------------

# text encoder -> (hook handle, eraser)
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install(pipe, eraser: Eraser) -> None:
    """Apply `eraser` to every prompt `pipe` encodes from now on."""
    one_text_encoder(pipe)
    if pipe.text_encoder in _HOOKS:
        raise EraserError("this pipeline already has an eraser installed; remove it first")

    def hook(module, args, output):
        output.last_hidden_state = eraser.edit(output.last_hidden_state)
        return output

    _HOOKS[pipe.text_encoder] = (pipe.text_encoder.register_forward_hook(hook), eraser)


def one_text_encoder(pipe) -> None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise EraserError(
            "gated erasure supports one text encoder (SD 1.x / 2.x), not SDXL's two; "
            "use erase: resteer for this model"
        )


def remove(pipe) -> None:
    """Take the installed eraser off `pipe` (nothing if none is)."""
    handle, _ = _HOOKS.pop(pipe.text_encoder, (None, None))
    if handle is not None:
        handle.remove()


def installed(pipe) -> bool:
    return installed_eraser(pipe) is not None


def installed_eraser(pipe) -> Eraser | None:
    text_encoder = getattr(pipe, "text_encoder", None)
    return _HOOKS.get(text_encoder, (None, None))[1] if text_encoder is not None else None


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
        "gates": json.dumps([{"id": g.id, "nearest": g.nearest} for g in eraser.gates]),
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
            if meta.get("format") != str(FORMAT):
                raise EraserError(
                    f"{path}: not an eraser file of format {FORMAT} (metadata {meta})"
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
            )
            for j, g in enumerate(json.loads(meta["gates"]))
        ]
        return Eraser(
            t["mean"], t["whiten"], gates, float(t["soft"][0]), json.loads(meta["config"])
        )
    except EraserError:
        raise
    except Exception as e:  # safetensors' own error, a missing file, a missing tensor or key
        raise EraserError(f"{path}: cannot read the eraser file ({type(e).__name__}: {e})") from e
