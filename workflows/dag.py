"""The stage graph of a pipeline run, and the cache key of each stage.

For a config the graph is::

    shard -> pretrain -> finetune@<p>  (one per label fraction p; deps dataset=shard, pretrain)
          \\-> baseline@<p>             (finetune.baseline; deps dataset=shard)
               finetune@<p> -> distill@<p>  (distill.enabled; deps dataset=shard, teacher=finetune@<p>)
    everything -> evaluate
    with tune.enabled: shard -> tune -> (every stage after shard takes the tune's best values)

A stage's cache key is a SHA-256 over its kind, its params, its kind's config slice (the typed
slice its stage function receives, :mod:`pipeline.slices`, after the kind's resource overrides;
fields that only shape the graph, e.g. ``finetune.label_fractions``, are in none), its upstream
keys in dependency order and the package version: a key changes when — and only when — something
the stage's result depends on changes. The shard stage's key covers the label fractions it writes
subsets for; the key its dependants fold in does not (each reads only its own fraction's subset).
Semi-supervised pretraining's labeled fraction is in its slice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pipeline
from pipeline.config import Config, subset_fractions
from pipeline.config import format_fraction as _format_fraction
from pipeline.errors import UserError
from pipeline.slices import SLICE_KINDS
from workflows.reads import config_slice

__all__ = [
    "Graph",
    "GraphError",
    "StageNode",
    "build_graph",
    "cache_key",
    "compute_keys",
    "format_fraction",
    "stage_config",
]


class GraphError(UserError, ValueError):
    """An invalid stage graph; ``str(err)`` is one line naming the culprit stage."""


@dataclass(eq=True)
class StageNode:
    """One stage of the graph.

    ``deps`` maps the stage's input name to the upstream stage that produces it (order matters: it
    is the order of upstream keys in the cache key); ``params`` are the stage's own parameters (for
    example ``{"fraction": 10.0}``); the config it reads is its kind's slice
    (:mod:`pipeline.slices`); ``training`` says whether the stage trains a network (runs on Ray
    Train, checkpoints).
    """

    name: str
    kind: str
    deps: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    training: bool = False


# Params in a stage's own key but not in the key its dependants see: the shard stage writes one
# label subset per fraction (so a shard with other subsets is another result), but every
# dependant reads at most its own fraction's subset, whose content does not depend on the others
# (so pretraining is still reused by a run with other fractions).
_NOT_FOR_DEPENDANTS: dict[str, tuple[str, ...]] = {"shard": ("label_fractions",)}


def format_fraction(p: float) -> str:
    """A label fraction (percent) as it appears in stage names: the subset files' own formatting
    (:func:`pipeline.config.format_fraction`), so stage ``finetune@<f>`` reads ``label_<f>``."""
    try:
        return _format_fraction(p)
    except ValueError as err:
        raise GraphError(f"graph error: {err}") from None


@dataclass
class Graph:
    """A set of :class:`StageNode` in declaration order."""

    nodes: list[StageNode]

    def __post_init__(self) -> None:
        self.nodes = list(self.nodes)

    # -- access ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StageNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return any(n.name == name for n in self.nodes)

    def __getitem__(self, name: str) -> StageNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"graph error: no stage named {name!r} (stages: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> Graph:
        """Check unique names, that every input is produced by a stage, and no cycles."""
        seen: set[str] = set()
        for n in self.nodes:
            if not n.name:
                raise GraphError(f"graph error: a {n.kind!r} stage has an empty name")
            if n.name in seen:
                raise GraphError(f"graph error: stage {n.name!r} is defined twice")
            seen.add(n.name)
        for n in self.nodes:
            for dep_input, up in n.deps.items():
                if up not in seen:
                    raise GraphError(
                        f"graph error: stage {n.name!r} input {dep_input!r} needs stage {up!r}, "
                        "which no stage produces"
                    )
                if up == n.name:
                    raise GraphError(f"graph error: stage {n.name!r} depends on itself")
        self._order()  # raises on a cycle
        return self

    def _order(self) -> list[StageNode]:
        by_name = {n.name: n for n in self.nodes}
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        order: list[StageNode] = []

        def visit(name: str, path: list[str]) -> None:
            s = state.get(name)
            if s == 2:
                return
            if s == 1:
                cycle = path[path.index(name) :] + [name]
                raise GraphError(f"graph error: cycle: {' -> '.join(cycle)}")
            state[name] = 1
            for up in by_name[name].deps.values():
                if up in by_name:
                    visit(up, path + [name])
            state[name] = 2
            order.append(by_name[name])

        for n in self.nodes:
            visit(n.name, [])
        return order

    def topological_order(self) -> list[StageNode]:
        """Every stage after all of its upstream stages (ties keep declaration order)."""
        return self._order()

    def ready(self, done: set[str] | frozenset[str]) -> list[StageNode]:
        """Stages not in ``done`` whose upstream stages are all in ``done``."""
        return [
            n
            for n in self.nodes
            if n.name not in done and all(up in done for up in n.deps.values())
        ]

    def dependants(self, name: str) -> list[str]:
        """All stages downstream of ``name`` (transitively), in declaration order."""
        out: set[str] = set()
        frontier = {name}
        while frontier:
            nxt = {n.name for n in self.nodes if set(n.deps.values()) & frontier} - out
            out |= nxt
            frontier = nxt
        return [n for n in self.names if n in out]

    def remaining_cost(self, cost: Callable[[StageNode], float]) -> dict[str, float]:
        """For each stage, the cost of the costliest path from it to a sink (a stage nothing
        depends on), itself included: ``cost(stage)`` plus the largest remaining cost among the
        stages that read it directly. The stage with the largest value heads the critical path."""
        readers: dict[str, set[str]] = {n.name: set() for n in self.nodes}
        for n in self.nodes:
            for up in n.deps.values():
                readers.setdefault(up, set()).add(n.name)
        out: dict[str, float] = {}
        for n in reversed(self._order()):  # every reader before the stage it reads
            out[n.name] = cost(n) + max((out[r] for r in readers[n.name]), default=0.0)
        return out


def build_graph(cfg: Config) -> Graph:
    """The validated stage graph for ``cfg``."""

    def node(
        name: str, kind: str, deps: dict[str, str], training: bool, **params: Any
    ) -> StageNode:
        return StageNode(name, kind, deps, dict(params), training)

    nodes = [
        # The shard stage writes one label subset per fraction: they are part of its result.
        node(
            "shard",
            "shard",
            {},
            False,
            label_fractions=[format_fraction(p) for p in subset_fractions(cfg)],
        ),
        node("pretrain", "pretrain", {"dataset": "shard"}, True),
    ]
    evaluated: list[str] = []
    for p in cfg.finetune.label_fractions:
        f = format_fraction(p)
        nodes.append(
            node(
                f"finetune@{f}",
                "finetune",
                {"dataset": "shard", "pretrain": "pretrain"},
                True,
                fraction=float(p),
            )
        )
        evaluated.append(f"finetune@{f}")
        if cfg.finetune.baseline:
            nodes.append(
                node(f"baseline@{f}", "baseline", {"dataset": "shard"}, True, fraction=float(p))
            )
            evaluated.append(f"baseline@{f}")
        if cfg.distill.enabled:
            nodes.append(
                node(
                    f"distill@{f}",
                    "distill",
                    {"dataset": "shard", "teacher": f"finetune@{f}"},
                    True,
                    fraction=float(p),
                )
            )
            evaluated.append(f"distill@{f}")
    eval_deps = {"dataset": "shard", "pretrain": "pretrain"}
    eval_deps.update({name: name for name in evaluated})
    nodes.append(node("evaluate", "evaluate", eval_deps, False))
    if cfg.tune.enabled:
        # The search comes first: every later stage takes its best values (a different head
        # depth changes every network built from cfg.model, not only the pretrained one).
        for n in nodes[1:]:
            n.deps["tune"] = "tune"
        nodes.insert(1, node("tune", "tune", {"dataset": "shard"}, True))
    return Graph(nodes).validate()


def stage_config(node: StageNode, cfg: Config) -> dict[str, Any]:
    """The config a stage's key hashes: its kind's slice (:func:`workflows.reads.config_slice`);
    a kind without one (a graph of other stages than the pipeline's) reads no config."""
    if node.kind not in SLICE_KINDS:
        return {}
    return config_slice(node.kind, cfg)


def cache_key(
    node: StageNode,
    cfg: Config,
    upstream_keys: Mapping[str, str],
    version: str | None = None,
) -> str:
    """SHA-256 hex of the stage's kind + params, its config slice, upstream keys and the version.

    ``upstream_keys`` maps each input name (or upstream stage name) of ``node.deps`` to that
    upstream stage's cache key; they enter the hash in dependency order.
    """
    ups: list[list[str]] = []
    for dep_input, up in node.deps.items():
        key = upstream_keys.get(dep_input, upstream_keys.get(up))
        if key is None:
            raise GraphError(f"graph error: stage {node.name!r}: no cache key for upstream {up!r}")
        ups.append([dep_input, key])
    blob = {
        "kind": node.kind,
        "params": node.params,
        "config": stage_config(node, cfg),
        "upstream": ups,
        "version": pipeline.__version__ if version is None else version,
    }
    raw = json.dumps(blob, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()


def compute_keys(graph: Graph, cfg: Config, version: str | None = None) -> dict[str, str]:
    """The cache key of every stage, by stage name."""
    keys: dict[str, str] = {}
    seen_by_dependants: dict[str, str] = {}
    for n in graph.topological_order():
        ups = {i: seen_by_dependants[up] for i, up in n.deps.items()}
        keys[n.name] = cache_key(n, cfg, ups, version)
        drop = _NOT_FOR_DEPENDANTS.get(n.kind, ())
        if any(p in n.params for p in drop):
            params = {k: v for k, v in n.params.items() if k not in drop}
            n_dep = StageNode(n.name, n.kind, n.deps, params, n.training)
            seen_by_dependants[n.name] = cache_key(n_dep, cfg, ups, version)
        else:
            seen_by_dependants[n.name] = keys[n.name]
    return keys
