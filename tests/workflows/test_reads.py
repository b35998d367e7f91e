"""Cache keys, field by field: every config field either reaches the key of every stage whose
result it changes (and no other), or is declared as changing no result.

``READERS`` below is this test's own account of which stage kinds read a field, taken from the
stage code (``pipeline/stages/*.py``, ``pipeline/models``, ``workflows/tune/``), independent of
the declarations in ``workflows/reads.py`` that the keys are computed from. A new config field
fails :func:`test_every_field_is_declared` and :func:`test_every_field_reaches_exactly_its_stages`
until it is classified in both places.
"""

from __future__ import annotations

import copy
import inspect
import types
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from pipeline.config import Config, ConfigError, StageKind, StageResources, parse_config
from pipeline.slices import SLICE_KINDS, slice_for
from workflows.dag import build_graph, compute_keys
from workflows.reads import NOT_RESULTS, RESOLVED, config_slice

TRAIN = {"pretrain", "finetune", "baseline", "distill"}
SUPERVISED = {"finetune", "baseline", "distill"}

# Stage kinds that read a field (longest matching prefix wins), from the code:
READERS: dict[str, set[str]] = {
    # seed_everything(cfg.seed ...) in every training stage; supervised_seed = finetune.seed or
    # seed; evaluate seeds its probes and plots; tune's trials are pretrain runs.
    "seed": {"tune", "pretrain", *SUPERVISED, "evaluate"},
    "data": {"shard"},
    "data.source": {"shard", "evaluate"},  # the report names it
    "augment": {"tune", "pretrain"},
    "augment.image_size": {"tune", "pretrain", *SUPERVISED, "evaluate"},  # view_size()
    # build_contrastive_model(cfg.model) / load + save_model(model_section=cfg.model...); the
    # student is cfg.model with distill.student applied; evaluate's header names some.
    "model": {"tune", "pretrain", *SUPERVISED, "evaluate"},
    "pretrain": {"tune", "pretrain"},
    "pretrain.bf16": {"tune", "pretrain", *SUPERVISED},  # SupervisedPlan(bf16=cfg.pretrain.bf16)
    "pretrain.method": {"tune", "pretrain", "evaluate"},
    "pretrain.temperature": {"tune", "pretrain", "evaluate"},
    "pretrain.epochs": {"tune", "pretrain", "evaluate"},
    "pretrain.batch_size": {"tune", "pretrain", "evaluate"},
    "pretrain.pseudo_label_from_epoch": {"tune", "pretrain", "evaluate"},
    "pretrain.pseudo_label_fraction": {"tune", "pretrain", "evaluate"},
    "pretrain.label_fraction": {"tune", "pretrain", "shard"},  # subset_fractions()
    "finetune": {"finetune", "baseline"},  # plan_for, build_network, run
    "finetune.crop_min_scale": SUPERVISED,  # distill's crop defaults to it
    "finetune.seed": SUPERVISED,
    "finetune.baseline_lr": {"baseline"},
    "finetune.consistency": {"finetune"},  # + baseline with consistency.baseline (below)
    "finetune.consistency.epochs": {"finetune", "evaluate"},
    "finetune.consistency.threshold": {"finetune", "evaluate"},
    "finetune.consistency.baseline": {"baseline", "evaluate"},
    "distill": {"distill"},
    "evaluate": {"evaluate"},
    # pretrain's online kNN monitor; tune scores its trials with it
    "evaluate.knn_k": {"evaluate", "tune", "pretrain"},
    "evaluate.knn_temperature": {"evaluate", "tune", "pretrain"},
    "tune": {"tune"},
    # workers split batches (training stages; evaluation and a tune trial are one process);
    # threads and device change float results everywhere torch computes.
    "resources.num_workers": TRAIN,
    "resources.cpus_per_worker": {"tune", *TRAIN, "evaluate"},
    "resources.torch_threads": {"tune", *TRAIN, "evaluate"},
    "resources.use_gpu": {"tune", *TRAIN, "evaluate"},
    # how the splits are read (in memory or streamed, the loader's workers and shuffle buffer):
    # every stage that reads images, not the shard stage
    "data.in_memory": {"tune", *TRAIN, "evaluate"},
    "data.memory_budget_mb": {"tune", *TRAIN, "evaluate"},
    "data.loader_workers": {"tune", *TRAIN, "evaluate"},
    "data.shuffle_buffer": {"tune", *TRAIN, "evaluate"},
    "finetune.label_fractions": set(),  # each stage's fraction is its param
    "finetune.baseline": set(),
    "distill.enabled": set(),
    "tune.enabled": set(),
    "resources.max_failures": set(),
    "resources.env": set(),  # read by workflows/ (the Ray runtime env), no stage function
}

# Reads deliberately left out of a kind's key: pretraining's online val kNN is a monitor in
# history.json only (never the weights), so a new evaluation k does not re-run pretraining.
MONITOR_ONLY: dict[str, set[str]] = {"pretrain": {"evaluate.knn_k", "evaluate.knn_temperature"}}

# Fields whose shard effect is only which label subsets it writes: the shard's own key changes,
# the key its dependants fold in does not (each reads only its own subset).
SUBSETS_ONLY = {"pretrain.label_fraction"}

# Base configs: the default graph; the consistency phase on for the baseline too (so its
# conditional reads are on); and a graph with the tune stage in front.
BASES: dict[str, dict[str, Any]] = {
    "default": {"finetune": {"label_fractions": [1, 10]}},
    "consistency": {
        "finetune": {"label_fractions": [1, 10], "consistency": {"epochs": 1, "baseline": True}}
    },
    "tune": {"finetune": {"label_fractions": [1, 10]}, "tune": {"enabled": True}},
}

# Values for fields whose default cannot simply be flipped, and the base they need.
SPECIAL: dict[str, tuple[dict[str, Any], Any]] = {
    "data.root": ({}, "/elsewhere"),
    "data.max_train": ({}, 100),
    "data.max_test": ({}, 100),
    "data.max_side": ({"data": {"source": "image-folder"}}, 64),
    "data.image_keys": ({}, ["png"]),
    "data.label_key": ({}, "json:label"),
    "data.in_memory": ({}, False),
    "finetune.label_fractions": ({}, [1, 20]),
    "model.head_hidden": ({}, 64),
    "augment.image_size": ({}, 16),
    "pretrain.lr": ({}, 0.1),
    "pretrain.label_fraction": ({}, 5.0),
    "pretrain.max_steps_per_epoch": ({}, 3),
    "pretrain.pseudo_label_from_epoch": ({"pretrain": {"method": "semisup"}}, 1),
    "finetune.baseline_lr": ({}, 0.5),
    "finetune.seed": ({}, 7),
    "distill.student.stem_stride": ({}, 2),
    "distill.crop_min_scale": ({}, 0.9),
    "tune.lr": ({}, (0.01, 0.1)),
    "resources.torch_threads": ({}, 3),
    "resources.env": ({}, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}),
    "tracking.uri": ({}, "sqlite:///elsewhere.db"),
}
_WDS = {"source": "webdataset", "train_urls": "train-{0..1}.tar", "test_urls": "test.tar"}
for _f, _v in {
    "train_urls": "other-{0..1}.tar",
    "test_urls": "other.tar",
    "val_urls": "val.tar",
    "classes": ["a", "b"],
}.items():
    SPECIAL[f"data.{_f}"] = ({"data": _WDS}, _v)


def leaf_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf field of the config model as (dotted path, annotation); sub-sections recurse."""
    out: list[tuple[str, Any]] = []
    hints = typing.get_type_hints(model)
    for name in model.model_fields:
        ann = hints[name]
        path = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaf_fields(ann, path + ".")
        else:
            out.append((path, ann))
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    node = out
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def _get(cfg: Config, path: str) -> Any:
    v: Any = cfg
    for p in path.split("."):
        v = getattr(v, p)
    return v


def _other_value(path: str, ann: Any, current: Any) -> Any:
    """A valid value different from ``current`` for a field of type ``ann``."""
    if current is None or isinstance(current, (list, dict)):
        raise AssertionError(f"{path}: no test value; add it to SPECIAL")
    choices = [a for a in get_args(ann) if get_origin(ann) is Literal]
    if not choices:  # Literal[...] | None
        for arg in get_args(ann):
            if get_origin(arg) is Literal:
                choices = list(get_args(arg))
    if choices:
        return next(c for c in choices if c != current)
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return current / 2 if current else 0.5
    if isinstance(current, str):
        return current + "-other"
    if isinstance(current, tuple):
        lo, hi = current
        return (lo, type(hi)(max(lo, hi / 2)) if hi != lo else hi * 2)
    raise AssertionError(f"{path}: no test value for {current!r}; add it to SPECIAL")


def readers(path: str, cfg: Config) -> set[str]:
    best = max((p for p in READERS if path == p or path.startswith(p + ".")), key=len, default=None)
    kinds = set(READERS[best]) if best is not None else set()
    if (
        path.startswith("finetune.consistency.")
        and path != "finetune.consistency.baseline"
        and cfg.finetune.consistency.baseline
    ):
        kinds.add("baseline")
    return kinds


def keyed_readers(path: str, cfg: Config) -> set[str]:
    """The readers whose key must follow the field (minus declared monitor-only reads)."""
    return {k for k in readers(path, cfg) if path not in MONITOR_ONLY.get(k, set())}


def expected_changes(cfg: Config, path: str, kinds: set[str]) -> set[str]:
    g = build_graph(cfg)
    direct = {n.name for n in g if n.kind in kinds}
    spread = direct - ({"shard"} if path in SUBSETS_ONLY else set())
    out = set(direct)
    for name in spread:
        out |= set(g.dependants(name))
    return out


def mutations() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(base name, field, base raw config, mutated raw config) for every field and base."""
    out = []
    for base_name, base in BASES.items():
        for path, ann in leaf_fields():
            if path == "resources.stages":
                continue  # expanded per kind below
            extra, value = SPECIAL.get(path, ({}, None))
            raw = _merge(base, extra)
            if path not in SPECIAL:
                value = _other_value(path, ann, _get(parse_config(raw), path))
            out.append((base_name, path, raw, _set(raw, path, value)))
        # resources.stages.<kind>.<field>: a per-kind override
        for kind in get_args(StageKind):
            for f in StageResources.model_fields:
                current = _get(parse_config(base), f"resources.{f}")
                value = 3 if current is None else (2 * current if f != "num_workers" else 2)
                over = {"resources": {"stages": {kind: {f: value}}}}
                out.append((base_name, f"resources.stages.{kind}.{f}", base, _merge(base, over)))
    return out


CASES = mutations()


@pytest.mark.parametrize(
    ("base_name", "path", "raw", "mutated"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES]
)
def test_every_field_reaches_exactly_its_stages(base_name, path, raw, mutated) -> None:
    cfg, other = parse_config(raw), parse_config(mutated)
    if path.startswith("resources.stages."):
        _, _, kind, f = path.split(".")
        assert other.resources.for_stage(kind) != cfg.resources.for_stage(kind)
        path_read = f"resources.{f}"
        # a Tune trial is a pretraining run: it runs with the pretrain kind's overrides
        runs_as = {kind} | ({"tune"} if kind == "pretrain" else set())
        kinds = runs_as & keyed_readers(path_read, cfg)
    else:
        assert _get(other, path) != _get(cfg, path), f"{path}: the test value changes nothing"
        path_read = path
        kinds = keyed_readers(path, cfg)
    g1, g2 = build_graph(cfg), build_graph(other)
    k1, k2 = compute_keys(g1, cfg), compute_keys(g2, other)
    if path in NOT_RESULTS:
        assert not kinds, f"{path} is declared as changing no result, but {kinds} read it"
        # Graph-shaping fields add or remove stages; a stage with the same inputs keeps its key.
        same = [
            n.name
            for n in g1
            if n.name in g2 and g2[n.name].deps == n.deps and g2[n.name].params == n.params
        ]
        assert {n for n in same if k1[n] != k2[n]} == set(), path
        return
    assert g1.names == g2.names, path
    changed = {n for n in k1 if k1[n] != k2[n]}
    assert changed == expected_changes(cfg, path_read, kinds), f"{base_name}: {path}"


def test_every_field_is_declared() -> None:
    """The fields no slice keys are exactly the ones this test's table says no stage reads, and
    every declared path is a config field; every kind's slice builds on every base."""
    fields = [p for p, _ in leaf_fields()]
    for p in [*NOT_RESULTS, *RESOLVED]:
        assert p in fields, f"{p}: declared but not a config field"
    assert not set(NOT_RESULTS) & set(RESOLVED)
    for raw in BASES.values():
        cfg = parse_config(raw)
        for kind in SLICE_KINDS:
            assert isinstance(config_slice(kind, cfg), dict)
    cfg = parse_config(BASES["consistency"])
    unread = {p for p in fields if not readers(p, cfg) and p not in RESOLVED}
    assert unread == set(NOT_RESULTS)


def test_bf16_is_in_every_stage_it_trains() -> None:
    """pretrain.bf16 sets the precision of fine-tuning, the baseline and distillation too: a
    baseline trained in bf16 is not reused for a float32 run."""
    raw = BASES["default"]
    cfg, bf = parse_config(raw), parse_config(_set(raw, "pretrain.bf16", True))
    k1, k2 = compute_keys(build_graph(cfg), cfg), compute_keys(build_graph(bf), bf)
    assert {n for n in k1 if k1[n] != k2[n]} == set(k1) - {"shard"}


def test_threads_override_for_one_kind_keys_that_kind_only() -> None:
    raw = BASES["default"]
    cfg = parse_config(raw)
    other = parse_config(_merge(raw, {"resources": {"stages": {"baseline": {"torch_threads": 4}}}}))
    k1, k2 = compute_keys(build_graph(cfg), cfg), compute_keys(build_graph(other), other)
    assert {n for n in k1 if k1[n] != k2[n]} == {"baseline@1", "baseline@10", "evaluate"}
    # the slice holds the resolved value
    assert slice_for("baseline", other).resources.torch_threads == 4
    assert config_slice("baseline", other)["resources"]["torch_threads"] == 4
    assert config_slice("finetune", other)["resources"]["torch_threads"] is None


def test_augment_backend_is_removed() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"augment": {"backend": "torchvision"}})
    msg = str(e.value)
    assert msg.startswith("config error: augment.backend: removed;") and "\n" not in msg


class _Reads:
    """A read-only view of a config section that records the dotted paths read through it.

    A field read records its path; a sub-section comes back as another view; a pydantic method
    (``model_dump``, ``model_copy``) records the whole section; properties and the config's own
    methods run against the view, so their reads are recorded too."""

    def __init__(self, obj: BaseModel, prefix: str, log: set[str]) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name: str) -> Any:
        obj, prefix, log = self._obj, self._prefix, self._log
        cls = type(obj)
        path = f"{prefix}.{name}" if prefix else name
        if name in cls.model_fields:
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                return _Reads(value, path, log)
            log.add(path)
            return value
        static = inspect.getattr_static(cls, name)
        if isinstance(static, property):
            return static.fget(self)
        if hasattr(BaseModel, name):
            log.add(prefix or "(everything)")
            return getattr(obj, name)
        if inspect.isfunction(static):
            return types.MethodType(static, self)
        return getattr(obj, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a stage assigned config field {name}")

    @property  # isinstance(view, ModelConfig) holds, as it does for the section itself
    def __class__(self) -> type:  # type: ignore[override]
        return type(self._obj)


def _leaves(d: Any, prefix: str = "") -> set[str]:
    """The dotted paths of a nested dict's leaves."""
    if not isinstance(d, dict) or not d:
        return {prefix}
    return {p for k, v in d.items() for p in _leaves(v, f"{prefix}.{k}" if prefix else k)}


# Keyed slice fields the recorded run below does not read, and why they are keyed all the same.
_STREAMED = {
    "data.loader_workers": "read when the splits are streamed (the run holds them in memory)",
    "data.shuffle_buffer": "read when the splits are streamed (the run holds them in memory)",
}
NOT_READ_IN_THE_RUN: dict[str, dict[str, str]] = {
    "pretrain": {
        **_STREAMED,
        "pretrain.base_lr": "read when pretrain.lr is None (the run sets it)",
        "pretrain.lr_scaling": "read when pretrain.lr is None (the run sets it)",
        "pretrain.label_fraction": "resolved into the slice's label_fraction, which is read",
    },
    "finetune": _STREAMED,
    "baseline": _STREAMED,
    "distill": _STREAMED,
    "evaluate": _STREAMED,
}


def test_stage_functions_read_what_their_keys_hash(tmp_path, monkeypatch) -> None:
    """Run the whole graph on digits with every read of each stage function's slice recorded:
    every field the stage's key hashes is read (``resources.*`` is read by workflows/, which
    runs the stage with those threads, workers and device), or listed above with the reason the
    run does not read it. A stage cannot read outside its slice: the slice has no such field."""
    import torch

    import workflows.local as local

    seen: dict[str, set[str]] = {}
    keyed: dict[str, set[str]] = {}
    real = local.stage_function

    def recording(kind: str):
        fn = real(kind)

        def run(settings, *args, **kwargs):
            keyed[kind] = _leaves(settings.key_dict())
            return fn(_Reads(settings, "", seen.setdefault(kind, set())), *args, **kwargs)

        return run

    monkeypatch.setattr(local, "stage_function", recording)
    fast = [
        "data.max_train=600",
        "pretrain.method=semisup",
        "pretrain.epochs=2",
        "pretrain.batch_size=64",
        "pretrain.max_steps_per_epoch=2",
        "pretrain.labeled_per_batch=8",
        "pretrain.pseudo_label_from_epoch=2",
        "pretrain.knn_bank=200",
        "pretrain.knn_queries=50",
        "finetune.label_fractions=[20]",
        "finetune.epochs=1",
        "finetune.min_steps=2",
        "finetune.consistency.epochs=1",
        "finetune.consistency.baseline=true",
        "finetune.consistency.batch_size=64",
        "distill.epochs=1",
        "distill.label_weight=0.5",
        "evaluate.linear_epochs=2",
        "evaluate.embedding_samples=40",
    ]
    from pipeline.config import load_config

    cfg = load_config("smoke", [*fast, f"storage.root={tmp_path}"])
    threads = torch.get_num_threads()
    try:
        local.run_local(cfg, tmp_path / "out", "cpu")
    finally:
        torch.set_num_threads(threads)
    assert set(seen) == {"pretrain", "finetune", "baseline", "distill", "evaluate"}
    unread = {
        kind: sorted(
            p
            for p in keyed[kind]
            if not p.startswith("resources.")
            and not any(p == r or p.startswith(r + ".") for r in seen[kind])
            and p not in NOT_READ_IN_THE_RUN.get(kind, {})
        )
        for kind in seen
    }
    assert not {k: v for k, v in unread.items() if v}, f"keyed but never read: {unread}"
    assert "bf16" in seen["baseline"]  # the read the keys once missed
