"""Build a cache on a dask.distributed cluster: one task per shard, every writer owns its shards.

The client plans the build (validating every input), fits the PCA basis if asked, and creates the
store; then each pending shard becomes a task. A worker builds its teacher once (kept for the
worker's lifetime), runs it on the shard's images and writes the shard whole, then its done
markers. Tasks are retried on failure; a worker killed mid-shard leaves that shard without done
markers, so the retry (or a later resume) redoes exactly it. The client aggregates progress into
one bar and finalises the store.

With ``workers=N`` a :class:`distributed.LocalCluster` of N single-threaded worker processes is
started — one per GPU when GPUs exist, each pinned with ``CUDA_VISIBLE_DEVICES``; with
``scheduler="tcp://host:port"`` an existing cluster is used (dask-jobqueue, Kubernetes, ...).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

from cache_tools.errors import ConfigError
from cache_tools.store import attach_cache

from .build import (
    BuildConfig,
    BuildProgress,
    BuildResult,
    already_complete,
    build_info,
    build_shards,
    plan_build,
    prepare_build,
)

__all__ = ["build_cache_distributed", "PinGPU"]

logger = logging.getLogger(__name__)

# one plan (teacher included) per worker process and configuration
_WORKER_PLANS: dict[str, object] = {}

#: seconds to wait for an existing scheduler before giving up (dask's own default is 30 s)
CONNECT_TIMEOUT = 5.0


class PinGPU:
    """Worker plugin: worker ``i`` sees only GPU ``i mod n`` (set before any CUDA call)."""

    name = "skd-pin-gpu"

    def __init__(self, gpus: int):
        self.gpus = gpus

    def setup(self, worker) -> None:
        try:
            index = int(str(worker.name).rsplit("-", 1)[-1])
        except ValueError:
            index = abs(hash(worker.name))
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % self.gpus)


def _worker_config(config: BuildConfig, threads: int | None) -> BuildConfig:
    # dask worker processes are daemonic and cannot fork DataLoader workers: decode in-process
    return replace(config, loader_workers=0, overwrite=False, threads=config.threads or threads)


def _build_shards_task(config: BuildConfig, shards: list[int], threads: int | None) -> dict:
    """Runs on a worker: build and write ``shards``; returns what it did."""
    cfg = _worker_config(config, threads)
    key = repr(cfg)
    plan = _WORKER_PLANS.get(key)
    if plan is None:
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        plan = _WORKER_PLANS[key] = plan_build(cfg)
    writer = attach_cache(cfg.out, plan.schema, storage_options=cfg.storage_options or None)  # type: ignore[attr-defined]
    done = writer.done()
    todo = [s for s in shards if not done[slice(*writer.schema.shard_range(s))].all()]
    t0 = time.perf_counter()
    written, nbytes, teacher_seconds = build_shards(plan, writer, todo)  # type: ignore[arg-type]
    return {
        "shards": todo,
        "entries": written,
        "bytes": nbytes,
        "teacher_seconds": teacher_seconds,
        "seconds": time.perf_counter() - t0,
        "worker_pid": os.getpid(),
    }


def _run_tasks(client, as_completed, config, writer, threads, shards_per_task, retries, progress, t0) -> dict:
    """Submit one task per group of pending shards and aggregate their reports into the progress bar."""
    schema = writer.schema
    pending = writer.pending_shards()
    groups = [pending[i : i + shards_per_task] for i in range(0, len(pending), shards_per_task)]
    total = schema.num_entries
    done_entries = total - sum(b - a for a, b in (schema.shard_range(s) for s in pending))
    stats = {"entries": 0, "bytes": 0, "teacher_seconds": 0.0, "tasks": 0}
    futures = [
        client.submit(_build_shards_task, config, g, threads, retries=retries, pure=False, key=f"skd-shards-{g[0]}")
        for g in groups
    ]
    for fut in as_completed(futures):
        out = fut.result()
        stats["entries"] += out["entries"]
        stats["bytes"] += out["bytes"]
        stats["teacher_seconds"] += out["teacher_seconds"]
        stats["tasks"] += 1
        done_entries += sum(b - a for a, b in (schema.shard_range(s) for s in out["shards"]))
        if progress is not None:
            progress(BuildProgress(done_entries, total, stats["bytes"], time.perf_counter() - t0, "written"))
    return stats


def _local_cluster(cluster_cls, client_cls, workers: int | None, quiet: bool):
    """(cluster, client, torch threads per worker) of a LocalCluster: one worker per GPU, else ``workers`` or 2."""
    gpus = _gpu_count()
    n = workers or (gpus or 2)
    threads = max(1, (os.cpu_count() or 1) // n) if not gpus else None
    cluster = cluster_cls(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        # no bokeh dashboard unless asked for; the scheduler still serves its health routes over
        # HTTP, so those go to a free local port rather than taking :8787
        dashboard_address=None if quiet else "127.0.0.1:8787",
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"} if quiet else None,
        silence_logs=logging.ERROR if quiet else logging.INFO,
    )
    client = client_cls(cluster)
    if gpus:
        client.register_plugin(PinGPU(gpus))
    return cluster, client, threads


def _connect(client_cls, scheduler: str):
    """A client of an existing scheduler, or one line saying it cannot be reached (after a few seconds)."""
    if "://" not in scheduler and ":" not in scheduler:
        raise ConfigError(f"--scheduler must be an address like tcp://host:8786, got {scheduler!r}")
    import dask

    try:
        # both timeouts: the client's own and its comm's, whose retries would otherwise run 30 s on
        with dask.config.set({"distributed.comm.timeouts.connect": f"{CONNECT_TIMEOUT}s"}):
            return client_cls(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the dask scheduler at {scheduler} within {CONNECT_TIMEOUT:.0f} s ({type(exc).__name__}): "
            "check the address and that the scheduler is running, or build locally with --workers N"
        ) from None


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def build_cache_distributed(
    config: BuildConfig,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    shards_per_task: int = 1,
    retries: int = 3,
    client=None,
    quiet: bool = True,
) -> BuildResult:
    """Build (or resume) ``config.out`` with dask.distributed.

    Args:
        workers: start a LocalCluster with this many worker processes (default: one per GPU, else 2).
        scheduler: address of an existing scheduler (``tcp://host:port``); excludes ``workers``.
        shards_per_task: shards per task (more: fewer teacher restarts; less: finer balancing).
        retries: how often a failed shard task is retried (a killed worker counts as a failure).
        client: an existing ``distributed.Client`` (tests).
        quiet: keep dask's own logging at WARNING and start no dashboard (``skdcache --verbose`` turns
            both on: INFO logs and the dashboard on 127.0.0.1:8787).
    """
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("--workers/--scheduler need dask.distributed: pip install 'skd[cluster]'") from None
    if workers is not None and scheduler is not None:
        raise ConfigError("give either --workers N (a local cluster) or --scheduler ADDRESS, not both")
    if workers is not None and workers < 1:
        raise ConfigError("--workers must be at least 1")
    # distributed configures its loggers at import (INFO); a user asked for a build, not a cluster log
    logging.getLogger("distributed").setLevel(logging.WARNING if quiet else logging.INFO)
    if client is None and scheduler is not None:
        client = _connect(Client, scheduler)

    t0 = time.perf_counter()
    try:
        plan, writer, resumed = prepare_build(config)  # validates every input before any worker starts
    except BaseException:
        if scheduler is not None:
            client.close()
        raise
    if writer.schema.status == "complete":  # nothing to run, and nothing to rewrite
        if scheduler is not None:
            client.close()
        return already_complete(plan, writer, time.perf_counter() - t0)

    own_cluster = None
    threads = None
    if client is None:
        own_cluster, client, threads = _local_cluster(LocalCluster, Client, workers, quiet)
    try:
        stats = _run_tasks(client, as_completed, config, writer, threads, shards_per_task, retries, progress, t0)
        n_workers = len(client.scheduler_info().get("workers", {}))
    finally:
        if own_cluster is not None or scheduler is not None:
            client.close()
        if own_cluster is not None:
            own_cluster.close()
    # a task that failed after its retries raised above; anything still missing is an error here
    final = writer.finalize(
        build_info(
            plan,
            time.perf_counter() - t0,
            stats["teacher_seconds"],
            workers=n_workers,
            scheduler=scheduler or "local",
        )
    )
    return BuildResult(
        url=config.out,
        schema=final,
        resumed=resumed,
        entries_written=stats["entries"],
        seconds=time.perf_counter() - t0,
        teacher_seconds=stats["teacher_seconds"],
        bytes_encoded=stats["bytes"],
        skipped_images=plan.skipped,
    )
