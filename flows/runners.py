"""Task runners: the default (threads in the flow's process) or Dask (processes, GPUs,
machines). Dask's scratch space goes inside the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

from fmn.run.folder import RunPaths

RUNNERS = ("default", "dask", "dask-cuda")


def task_runner(kind: str, run: Path | str, workers: int = 2, address: str | None = None):
    """A Prefect task runner. default: a thread pool in this process (GPU stages still
    take turns: they share one loaded model). dask: a LocalCluster of `workers`
    processes, one thread each; dask-cuda: a LocalCUDACluster, one worker per visible GPU;
    `address`: an existing Dask scheduler (tcp://host:8786) instead of a new cluster."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if kind not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {kind!r}")
    if kind == "default":
        if address:
            raise ValueError("--address needs --runner dask")
        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    scratch = RunPaths(Path(run)).dask
    scratch.mkdir(parents=True, exist_ok=True)
    if kind == "dask-cuda":
        # one worker per GPU in CUDA_VISIBLE_DEVICES; needs `pip install dask-cuda`
        kwargs = {"local_directory": str(scratch), "dashboard_address": None}
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=kwargs)
    kwargs = {
        "n_workers": workers,
        "threads_per_worker": 1,  # torch already uses the cores a worker has
        "processes": True,
        "local_directory": str(scratch),
        "dashboard_address": None,  # no port to collide with other clusters
        "silence_logs": logging.WARNING,  # the console shows progress, not cluster chatter
    }
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
