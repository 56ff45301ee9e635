"""The device slot: a Prefect global concurrency limit that GPU stages hold while they
run, so that several concepts never fight for one GPU (one slot per GPU; Dask workers on
other machines share it through the Prefect API).

On a machine without CUDA no slot is taken by default: there is no device to share (the
worker count already bounds memory), and a slot held by a run that is killed stays taken
until Prefect's lease repossessor frees it, which the ephemeral API server that `fmn run`
starts when no server is configured does not run. Set FMN_DEVICE_SLOT=<name> to take a
named slot anyway (FMN_DEVICE_SLOT= or none switches it off on GPUs), FMN_DEVICE_SLOTS to
size it when it is created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress

GPU_SLOT = "fmn-gpu"


def slot_name() -> str | None:
    """The slot GPU stages take here, or None."""
    if "FMN_DEVICE_SLOT" in os.environ:
        name = os.environ["FMN_DEVICE_SLOT"].strip()
        return None if name.lower() in ("", "none") else name
    import torch

    return GPU_SLOT if torch.cuda.is_available() else None


def slot_size() -> int:
    if os.environ.get("FMN_DEVICE_SLOTS"):
        return int(os.environ["FMN_DEVICE_SLOTS"])
    import torch

    return max(1, torch.cuda.device_count())


def ensure_device_slot(limit: int | None = None) -> str | None:
    """Create the device slot if it does not exist (an existing one keeps its limit: other
    runs may share it). Idempotent; returns its name, or None when no slot is used."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = slot_name()
    if name is None:
        return None
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            size = limit or slot_size()
            with suppress(ObjectAlreadyExists):  # another run made it a moment ago
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=size)
                )
    return name


@contextmanager
def device_slot() -> Iterator[None]:
    """Hold one slot of the device limit (strict: a missing limit is an error, not a
    silent free-for-all)."""
    name = slot_name()
    if name is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1, strict=True):
        yield
