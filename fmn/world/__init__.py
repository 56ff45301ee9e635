"""The embedded concept world: a procedural image generator, a tiny Stable-Diffusion model
trained on it, and a classifier that measures its concepts (see DESIGN.md)."""

from pathlib import Path

EMBEDDED_NAME = "embedded:tiny-world"
ASSETS_DIR = Path(__file__).parent / "assets"
EMBEDDED_DIR = ASSETS_DIR / "tiny-world"
# The worlds share one CLIP tokenizer (1.5 MB of vocab.json + merges.txt) in this folder,
# beside them: a world's own tokenizer/ keeps only its tokenizer_config.json.
SHARED_TOKENIZER = "clip-tokenizer"
