"""The ``shard`` stage on Ray: the same :func:`pipeline.stages.shard.run`, with one Ray task per
shard (``ray.remote`` over :func:`pipeline.data.shards.write_shard`, which reads, decode-checks and
writes one shard's files, or over :func:`pipeline.data.external.index_shard`, which indexes one
external shard in place). Results are collected with ``ray.get`` in plan order, so the output is
byte-identical to a one-process run; a task's :class:`DataError` comes back as itself (one line
naming the file or shard URL), not wrapped in Ray's traceback."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import ray

from pipeline.atomic import atomic_write_bytes
from pipeline.config import Config
from pipeline.data.shards import ShardSpec
from pipeline.data.sources import DataError
from pipeline.runtime import StageResult
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage

__all__ = ["ray_map", "shard_with_ray"]


def _write_elsewhere(fn: Callable[[Any], Any], item: Any) -> tuple[Any, bytes | None]:
    """Run ``fn`` on a shard spec with its tar written in this task's own temp folder, and return
    the result (with the spec's path) and the tar's bytes: for a task on a node that does not see
    the caller's folder. Any other item (an external shard to index) is passed through."""
    if not isinstance(item, ShardSpec):
        return fn(item), None
    with tempfile.TemporaryDirectory(prefix="contrastive-shard-") as tmp:
        res = fn(dataclasses.replace(item, path=os.path.join(tmp, os.path.basename(item.path))))
        with open(res.path, "rb") as f:
            data = f.read()
    return dataclasses.replace(res, path=item.path), data


def ray_map(
    num_cpus: float = 1.0, max_in_flight: int | None = None, ship_bytes: bool = False
) -> Callable[..., list[Any]]:
    """A ``map(fn, items)`` that runs ``fn`` as Ray tasks and returns the results in order.

    At most ``max_in_flight`` tasks are submitted ahead of the results (default: unbounded), which
    bounds how many shard specs sit in the object store at once. With ``ship_bytes`` each task
    that writes a shard returns its bytes and this process writes them to the spec's path: the
    tasks may run on nodes that do not see that folder (a run on object storage, where the
    coordinator's output folder is its own scratch).
    """
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight: must be >= 1 (got {max_in_flight})")

    def _map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        if ship_bytes:
            shipping = ray.remote(num_cpus=num_cpus, max_retries=2)(_write_elsewhere)
            submit = lambda item: shipping.remote(fn, item)  # noqa: E731
        else:
            submit = ray.remote(num_cpus=num_cpus, max_retries=2)(fn).remote

        def take(ref: Any) -> Any:
            got = _get(ref)
            if not ship_bytes:
                return got
            res, data = got
            if data is not None:
                atomic_write_bytes(res.path, data)
            return res

        refs: list[Any] = []
        results: list[Any] = []
        for item in items:
            refs.append(submit(item))
            if max_in_flight is not None and len(refs) - len(results) >= max_in_flight:
                results.append(take(refs[len(results)]))
        results.extend(take(r) for r in refs[len(results) :])
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
    cfg: Config,
    out_dir: str | os.PathLike[str],
    max_in_flight: int | None = None,
    ship_bytes: bool = False,
) -> StageResult:
    """Run the shard stage with Ray tasks writing the shards (a private local Ray only if none is
    connected); ``ship_bytes``: see :func:`ray_map`."""
    if not ray.is_initialized():
        ray.init(address="local")
    return shard_stage.run(
        ShardSlice.of(cfg),
        out_dir,
        map_fn=ray_map(max_in_flight=max_in_flight, ship_bytes=ship_bytes),
    )
