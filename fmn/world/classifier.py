"""The world classifier: the `world` detector of the M-Score.

A small CNN with one softmax head per category (identity, shape, style, colour). Class 0
of every head is "none of these" (a portrait has no shape), so a head can say the
concept is absent. It measures: it never feeds a loss or runs inside the product, and
anything chosen by looking at its numbers is chosen on tune concepts only (docs/world.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fmn.world.concepts import TINY


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
    )


class WorldClassifier(nn.Module):
    """Images in [-1, 1], N x 3 x 32 x 32 -> logits per head (class 0 = none)."""

    def __init__(self, width: int = 48, heads: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width),
            nn.MaxPool2d(2),
            _block(width, width * 2),
            nn.MaxPool2d(2),
            _block(width * 2, width * 4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.names = dict(heads or TINY.heads)
        self.heads = nn.ModuleDict(
            {h: nn.Linear(width * 4, len(v) + 1) for h, v in self.names.items()}
        )
        self.width = width

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {h: head(f) for h, head in self.heads.items()}

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per head, probabilities of each concept (the 'none' column dropped)."""
        return {h: F.softmax(v, dim=-1)[:, 1:] for h, v in self(x).items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise, contrast and small shifts: what a generated image differs by."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    blurred = []
    for i in range(n):  # separable per-image blur; n is small (one batch)
        w = kern[i]
        xi = F.conv2d(
            F.pad(x[i : i + 1], (2, 2, 0, 0), mode="replicate"),
            w.view(1, 1, 1, 5).repeat(3, 1, 1, 1),
            groups=3,
        )
        xi = F.conv2d(
            F.pad(xi, (0, 0, 2, 2), mode="replicate"),
            w.view(1, 1, 5, 1).repeat(3, 1, 1, 1),
            groups=3,
        )
        blurred.append(xi)
    x = torch.cat(blurred)
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    x = x * contrast + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    x = x + torch.randn(x.shape, generator=gen) * 0.04 * torch.rand(n, 1, 1, 1, generator=gen)
    shift = torch.randint(-2, 3, (2,), generator=gen)
    return torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3)).clamp(-1, 1)


def save_classifier(clf: WorldClassifier, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float16) if v.is_floating_point() else v
        for k, v in clf.state_dict().items()
    }
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"width": clf.width, "heads": clf.names}, indent=2))


def load_classifier(path: Path, heads: dict[str, list[str]] | None = None) -> WorldClassifier:
    """Load a world classifier; its heads come from its config (they name the concepts it
    measures). With `heads`, a classifier trained on other concepts is refused."""
    cfg = json.loads((path / "config.json").read_text())
    if heads is not None and any(cfg["heads"].get(h) != v for h, v in heads.items()):
        raise RuntimeError(f"classifier at {path} was trained on other concepts; rebuild the world")
    clf = WorldClassifier(cfg["width"], cfg["heads"])
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in load_file(str(path / "model.safetensors")).items()
    }
    clf.load_state_dict(state)
    return clf.eval()
