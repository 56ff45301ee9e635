"""The embedded concept world: a procedural image generator, a tiny Stable-Diffusion model
trained on it, and a classifier that measures its concepts (see DESIGN.md)."""

from pathlib import Path

EMBEDDED_NAME = "embedded:tiny-world"
EMBEDDED_DIR = Path(__file__).parent / "assets" / "tiny-world"
