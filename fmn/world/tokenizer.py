"""A real CLIP tokenizer built offline.

Provenance: the BPE merges are open_clip's `bpe_simple_vocab_16e6.txt.gz` (the OpenAI CLIP
vocabulary, MIT licence), which ships inside the `open_clip_torch` wheel. The vocabulary
is rebuilt exactly as OpenAI's `SimpleTokenizer` does (bytes, bytes + '</w>', one entry per
merge, then the two special tokens), which gives 49408 ids identical to OpenAI CLIP.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # the slice OpenAI's SimpleTokenizer takes


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def open_clip_bpe_path() -> Path:
    """Path of the BPE file shipped in the open_clip_torch wheel."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_files(out_dir: Path, model_max_length: int) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json into out_dir."""
    with gzip.open(open_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_txt)
    tok = load_tokenizer(out_dir, model_max_length)
    tok.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: Path, model_max_length: int | None = None) -> CLIPTokenizer:
    """Load a CLIP tokenizer from a local folder and check it is whole.

    transformers 5 silently ignores `vocab_file=` in the constructor and an offline
    `from_pretrained(<hub id>)` can return a 2-token tokenizer, so the size is asserted.
    """
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    if len(tok) < CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"tokenizer at {path} has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}: "
            "its vocab.json/merges.txt are missing or broken"
        )
    return tok
