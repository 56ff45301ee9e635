"""Shared fixtures. Tests never touch the network: the hub is switched off at import."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# One torch thread is faster than two on a busy 2-core machine (see shared/PROBES.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

from fmn.world.tokenizer import write_clip_tokenizer_files
from tests.flow_helpers import prefect_api  # noqa: F401  (one Prefect API for the session)
from tests.tiny import FAMILIES, build_tiny_pipeline


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 49408-token CLIP tokenizer, built offline, with SD's 77-token context."""
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip-tokenizer"), 77)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, clip_tokenizer_dir):
    """A tiny in-memory pipeline of each family, built once per test module."""
    import torch

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(request.param, clip_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe
