"""The ``shard`` stage on Ray: the same :func:`pipeline.stages.shard.run`, with one Ray task per
shard (``ray.remote`` over :func:`pipeline.data.shards.write_shard`, which reads, decode-checks and
writes one shard's files, or over :func:`pipeline.data.external.index_shard`, which indexes one
external shard in place). Results are collected with ``ray.get`` in plan order, so the output is
byte-identical to a one-process run; a task's :class:`DataError` comes back as itself (one line
naming the file or shard URL), not wrapped in Ray's traceback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import ray

from pipeline.data.sources import DataError
from pipeline.runtime import StageResult
from pipeline.stages import shard as shard_stage

__all__ = ["ray_map", "shard_with_ray"]


def ray_map(num_cpus: float = 1.0, max_in_flight: int | None = None) -> Callable[..., list[Any]]:
    """A ``map(fn, items)`` that runs ``fn`` as Ray tasks and returns the results in order.

    At most ``max_in_flight`` tasks are submitted ahead of the results (default: unbounded), which
    bounds how many shard specs sit in the object store at once.
    """
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight: must be >= 1 (got {max_in_flight})")

    def _map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        refs: list[Any] = []
        results: list[Any] = []
        for item in items:
            refs.append(remote.remote(item))
            if max_in_flight is not None and len(refs) - len(results) >= max_in_flight:
                results.append(_get(refs[len(results)]))
        results.extend(_get(r) for r in refs[len(results) :])
        return results

    return _map


def _get(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, DataError):
            raise DataError(str(err.cause)) from None
        raise


def shard_with_ray(
    cfg: Any, out_dir: str | os.PathLike[str], max_in_flight: int | None = None
) -> StageResult:
    """Run the shard stage with Ray tasks writing the shards (``ray.init()`` only if needed)."""
    if not ray.is_initialized():
        ray.init(address="local")
    return shard_stage.run(cfg, out_dir, map_fn=ray_map(max_in_flight=max_in_flight))
