"""The stage graph: shape per config, validation errors, cache keys."""

from __future__ import annotations

import pytest

from pipeline.config import parse_config
from workflows.dag import (
    Graph,
    GraphError,
    StageNode,
    build_graph,
    cache_key,
    compute_keys,
    format_fraction,
    stage_config,
)


def cfg_with(**sections):
    return parse_config({"finetune": {"label_fractions": [1, 10]}, **sections})


def test_format_fraction():
    assert format_fraction(1.0) == "1"
    assert format_fraction(10.0) == "10"
    assert format_fraction(0.1) == "0.1"
    assert format_fraction(100) == "100"
    with pytest.raises(GraphError, match=r"outside \(0, 100\]"):
        format_fraction(0)


def test_full_graph_shape():
    g = build_graph(cfg_with())
    assert g.names == [
        "shard",
        "pretrain",
        "finetune@1",
        "baseline@1",
        "distill@1",
        "finetune@10",
        "baseline@10",
        "distill@10",
        "evaluate",
    ]
    assert g["pretrain"].deps == {"dataset": "shard"}
    assert g["finetune@10"].deps == {"dataset": "shard", "pretrain": "pretrain"}
    assert g["finetune@10"].params == {"fraction": 10.0}
    assert g["baseline@1"].deps == {"dataset": "shard"}
    assert g["distill@1"].deps == {"dataset": "shard", "teacher": "finetune@1"}
    ev = g["evaluate"].deps
    assert ev["dataset"] == "shard" and ev["pretrain"] == "pretrain"
    assert set(ev.values()) == set(g.names) - {"evaluate"}
    assert [n.training for n in g] == [False, True, True, True, True, True, True, True, False]
    order = [n.name for n in g.topological_order()]
    for n in g:
        for up in n.deps.values():
            assert order.index(up) < order.index(n.name)


def test_graph_without_distill_and_baseline():
    g = build_graph(
        cfg_with(
            distill={"enabled": False}, finetune={"label_fractions": [1, 10], "baseline": False}
        )
    )
    assert g.names == ["shard", "pretrain", "finetune@1", "finetune@10", "evaluate"]
    assert set(g["evaluate"].deps.values()) == {"shard", "pretrain", "finetune@1", "finetune@10"}


def test_graph_with_baseline_without_distill():
    g = build_graph(cfg_with(distill={"enabled": False}))
    assert g.names == [
        "shard",
        "pretrain",
        "finetune@1",
        "baseline@1",
        "finetune@10",
        "baseline@10",
        "evaluate",
    ]


def test_ready_and_dependants():
    g = build_graph(cfg_with(distill={"enabled": False}))
    assert [n.name for n in g.ready(set())] == ["shard"]
    assert [n.name for n in g.ready({"shard"})] == ["pretrain", "baseline@1", "baseline@10"]
    assert [n.name for n in g.ready({"shard", "pretrain"})] == [
        "finetune@1",
        "baseline@1",
        "finetune@10",
        "baseline@10",
    ]
    assert g.dependants("pretrain") == ["finetune@1", "finetune@10", "evaluate"]


def test_remaining_cost_is_the_costliest_path_to_a_sink():
    g = Graph(
        [
            StageNode("lone", "x"),
            StageNode("a", "x"),
            StageNode("b", "y", deps={"in": "a"}),
            StageNode("c", "x", deps={"in": "b"}),
            StageNode("d", "x", deps={"in": "a"}),
        ]
    )
    cost = {"x": 1.0, "y": 5.0}
    assert g.remaining_cost(lambda n: cost[n.kind]) == {
        "lone": 1.0,
        "a": 7.0,  # a -> b -> c, not a -> d
        "b": 6.0,
        "c": 1.0,
        "d": 1.0,
    }
    full = build_graph(cfg_with()).remaining_cost(lambda n: 1.0)
    assert full["shard"] == 5.0  # shard -> pretrain -> finetune -> distill -> evaluate
    assert full["evaluate"] == 1.0 and full["baseline@1"] == 2.0


def test_cycle_detected():
    g = Graph(
        [
            StageNode("a", "x", {"in": "c"}),
            StageNode("b", "x", {"in": "a"}),
            StageNode("c", "x", {"in": "b"}),
        ]
    )
    with pytest.raises(GraphError, match=r"cycle: a -> c -> b -> a|cycle: .*a.*") as e:
        g.validate()
    assert "\n" not in str(e.value)


def test_missing_input_detected():
    g = Graph([StageNode("a", "x"), StageNode("b", "x", {"model": "nowhere"})])
    with pytest.raises(
        GraphError, match="stage 'b' input 'model' needs stage 'nowhere', which no stage produces"
    ):
        g.validate()


def test_duplicate_and_self_dependency():
    with pytest.raises(GraphError, match="'a' is defined twice"):
        Graph([StageNode("a", "x"), StageNode("a", "y")]).validate()
    with pytest.raises(GraphError, match="'a' depends on itself"):
        Graph([StageNode("a", "x", {"i": "a"})]).validate()


def test_cache_key_changes_only_with_relevant_sections():
    base = compute_keys(build_graph(cfg_with()), cfg_with())

    def keys(**sections):
        c = cfg_with(**sections)
        return compute_keys(build_graph(c), c)

    # evaluate settings: only evaluate changes
    k = keys(evaluate={"knn_k": 20})
    assert [n for n in base if base[n] != k[n]] == ["evaluate"]
    # pretrain temperature: everything downstream of pretrain, not shard/baseline
    k = keys(pretrain={"temperature": 0.5})
    changed = {n for n in base if base[n] != k[n]}
    assert changed == {
        "pretrain",
        "finetune@1",
        "finetune@10",
        "distill@1",
        "distill@10",
        "evaluate",
    }
    # distill settings: only distill and evaluate
    k = keys(distill={"temperature": 2.0})
    assert {n for n in base if base[n] != k[n]} == {"distill@1", "distill@10", "evaluate"}
    # data: everything
    k = keys(data={"seed": 3})
    assert all(base[n] != k[n] for n in base)
    # runtime-only keys change nothing
    k = keys(
        resources={"max_failures": 5},
        tracking={"experiment": "other"},
    )
    assert k == base
    # the worker count splits every batch across ranks: each training stage is another result
    # (and so is everything downstream); the shard and the one-process evaluation are not
    k = keys(resources={"num_workers": 2})
    assert {n for n in base if base[n] != k[n]} == set(base) - {"shard"}
    assert stage_config(build_graph(cfg_with())["evaluate"], cfg_with()) == stage_config(
        build_graph(cfg_with())["evaluate"], cfg_with(resources={"num_workers": 2})
    )
    # adding a fraction leaves existing stages' keys alone (except evaluate, whose deps grow,
    # and shard, which writes one more subset)
    c = parse_config({"finetune": {"label_fractions": [1, 10, 50]}})
    k = compute_keys(build_graph(c), c)
    assert all(k[n] == base[n] for n in base if n not in ("evaluate", "shard"))
    assert k["shard"] != base["shard"]
    assert k["evaluate"] != base["evaluate"]


def test_finetune_seed_reseeds_supervised_stages_only():
    """finetune.seed: the encoder (and the data) keep their keys, so --reuse re-runs only the
    fine-tuning, baseline, distillation and evaluation."""
    base = compute_keys(build_graph(cfg_with()), cfg_with())
    c = cfg_with(finetune={"label_fractions": [1, 10], "seed": 7})
    assert c.supervised_seed == 7 and cfg_with().supervised_seed == cfg_with().seed == 0
    k = compute_keys(build_graph(c), c)
    assert {n for n in base if base[n] != k[n]} == {
        n for n in base if n not in ("shard", "pretrain")
    }


def test_consistency_phase_keys_the_baseline_only_when_it_trains_with_it():
    base = compute_keys(build_graph(cfg_with()), cfg_with())
    on = {"label_fractions": [1, 10], "consistency": {"epochs": 2}}
    c = cfg_with(finetune=on)
    k = compute_keys(build_graph(c), c)
    assert {n for n in base if base[n] != k[n]} == {
        "finetune@1",
        "finetune@10",
        "distill@1",
        "distill@10",
        "evaluate",
    }
    c = cfg_with(finetune={**on, "consistency": {"epochs": 2, "baseline": True}})
    k2 = compute_keys(build_graph(c), c)
    assert k2["baseline@1"] != k["baseline@1"] and k2["finetune@1"] == k["finetune@1"]


def test_semisup_pretraining_key_follows_the_labels_it_sees():
    """Semi-supervised pretraining uses the smallest fine-tuning fraction's labels unless
    pretrain.label_fraction says otherwise: that fraction is part of its key, so a run with
    other fractions cannot reuse an encoder that saw a different labeled subset."""

    def pretrain_key(fractions, **pretrain):
        c = parse_config({"finetune": {"label_fractions": fractions}, "pretrain": pretrain})
        return compute_keys(build_graph(c), c)["pretrain"]

    semi = {"method": "semisup"}
    assert pretrain_key([1, 10], **semi) != pretrain_key([10, 20], **semi)  # smallest 1 vs 10
    assert pretrain_key([1, 10], **semi) == pretrain_key([1, 20], **semi)  # smallest 1 both
    fixed = {"method": "semisup", "label_fraction": 5}
    assert pretrain_key([1, 10], **fixed) == pretrain_key([10, 20], **fixed)
    assert pretrain_key([1, 10], **fixed) != pretrain_key([1, 10], **semi)
    # SimCLR sees no labels: its key does not depend on the fractions
    assert pretrain_key([1, 10], method="simclr") == pretrain_key([10, 20], method="simclr")


def test_cache_key_includes_version_params_and_upstream():
    c = cfg_with()
    n = build_graph(c)["finetune@1"]
    ups = {"dataset": "k1", "pretrain": "k2"}
    k = cache_key(n, c, ups, version="1")
    assert len(k) == 64
    assert k == cache_key(n, c, ups, version="1")
    assert k != cache_key(n, c, ups, version="2")
    assert k != cache_key(n, c, {"dataset": "k1", "pretrain": "k3"}, version="1")
    other = StageNode(n.name, n.kind, n.deps, {"fraction": 2.0}, n.training)
    assert k != cache_key(other, c, ups, version="1")
    with pytest.raises(GraphError, match="no cache key for upstream 'pretrain'"):
        cache_key(n, c, {"dataset": "k1"})


def test_a_stage_kind_without_a_slice_reads_no_config():
    c = cfg_with()
    assert stage_config(StageNode("x", "x"), c) == {}
    # a pipeline kind's key hashes its slice
    got = stage_config(StageNode("p", "pretrain"), c)
    assert got["pretrain"]["temperature"] == c.pretrain.temperature and "finetune" not in got
