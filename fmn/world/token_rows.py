"""A world's token table without shipping it: the rows its captions train, and the rest
drawn from a fixed seed.

A text encoder over CLIP's 49408-token vocabulary carries a table of 49408 x width
numbers, nearly all of them rows no world caption ever uses. At crowd-world's width
(docs/world.md: wide enough that its 216 concepts are not crowded into fewer dimensions
than they number) that table alone would exceed the package's size budget. So such a
world trains only the rows its captions use (`compact_ids`), and its full table is those
rows over rows drawn from `ROW_SEED` (`seeded_table`), bit for bit the same at build, ship
and load time. The shipped text encoder leaves the table out and keeps the trained rows in
`ROWS_FILE` beside its weights (`split_table` / `fill_table`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROWS_FILE = "token_rows.safetensors"
TABLE_KEY = "embeddings.token_embedding.weight"  # transformers < 5.6: "text_model." before
ROW_SEED = 0
ROW_STD = 0.02  # CLIP's initializer range: what an untrained row holds


def seeded_table(
    vocab: int, width: int, seed: int = ROW_SEED, std: float = ROW_STD
) -> torch.Tensor:
    """[vocab, width] fp32 rows from `seed`, rounded through fp16 so that a shipped (fp16)
    and a freshly built table agree exactly."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, width, generator=gen) * std).half().float()


def compact_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(used, compact): the sorted token ids that occur in `ids`, and `ids` renumbered as
    positions in `used` (what a text encoder with a len(used)-row table is trained on)."""
    used = torch.unique(ids)
    lookup = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    lookup[used] = torch.arange(len(used))
    return used, lookup[ids]


def full_table(rows: torch.Tensor, used: torch.Tensor, vocab: int) -> torch.Tensor:
    """The [vocab, width] table: the trained `rows` at ids `used`, seeded rows elsewhere
    (the trained rows rounded through fp16, as shipped)."""
    table = seeded_table(vocab, rows.shape[1])
    table[used] = rows.detach().float().half().float()
    return table


def split_table(state: dict[str, torch.Tensor], out_dir: Path) -> dict[str, torch.Tensor]:
    """Write the table's non-seeded rows to out_dir/ROWS_FILE and return `state` without
    the table (the rest of the text encoder's weights)."""
    key = next(k for k in state if k.endswith(TABLE_KEY))
    table = state[key].float()
    seeded = seeded_table(*table.shape)
    used = torch.nonzero((table.half().float() != seeded).any(dim=1)).flatten()
    save_file(
        {"ids": used, "rows": table[used].half().contiguous()},
        str(out_dir / ROWS_FILE),
        metadata={"seed": str(ROW_SEED), "std": str(ROW_STD), "vocab": str(table.shape[0])},
    )
    return {k: v for k, v in state.items() if k != key}


def fill_table(rows_file: Path) -> torch.Tensor:
    """The full table a ROWS_FILE stands for."""
    with safe_open(str(rows_file), framework="pt") as f:
        meta = f.metadata()
        ids, rows = f.get_tensor("ids"), f.get_tensor("rows")
    table = seeded_table(int(meta["vocab"]), rows.shape[1], int(meta["seed"]), float(meta["std"]))
    table[ids] = rows.float()
    return table
