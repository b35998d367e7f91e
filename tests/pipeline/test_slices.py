"""The typed config slices each stage kind receives (pipeline/slices.py)."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from pipeline.config import load_config, parse_config
from pipeline.slices import (
    SLICE_KINDS,
    DistillSlice,
    EvaluateSlice,
    PretrainSlice,
    ShardSlice,
    SupervisedSlice,
    slice_for,
)


def test_every_pipeline_kind_has_a_slice_and_others_fail_by_name() -> None:
    cfg = load_config("demo")
    assert SLICE_KINDS == {
        "shard",
        "tune",
        "pretrain",
        "finetune",
        "baseline",
        "distill",
        "evaluate",
    }
    for kind in SLICE_KINDS:
        s = slice_for(kind, cfg)
        assert pickle.loads(pickle.dumps(s)) == s  # shipped to Ray workers
    with pytest.raises(KeyError, match="'pretrian' has no config slice"):
        slice_for("pretrian", cfg)


def test_a_stage_cannot_read_outside_its_slice_or_change_it() -> None:
    s = SupervisedSlice.of(load_config("demo"))
    with pytest.raises(AttributeError):
        s.pretrain  # noqa: B018  (fine-tuning reads pretrain.bf16 only, as its own field)
    with pytest.raises(AttributeError):
        s.finetune.label_fractions  # noqa: B018  (the graph's, not the stage's)
    with pytest.raises(ValidationError):
        s.seed = 3  # type: ignore[misc]


def test_the_supervised_seed_is_resolved() -> None:
    assert SupervisedSlice.of(parse_config({"seed": 4})).seed == 4
    cfg = parse_config({"seed": 4, "finetune": {"seed": 9}})
    assert SupervisedSlice.of(cfg).seed == DistillSlice.of(cfg).seed == 9
    assert PretrainSlice.of(cfg).seed == EvaluateSlice.of(cfg).seed == 4


def test_semisup_reads_its_labeled_fraction_and_the_other_methods_none() -> None:
    fr = {"finetune": {"label_fractions": [10, 1]}}
    assert (
        PretrainSlice.of(parse_config({**fr, "pretrain": {"method": "semisup"}})).label_fraction
        == 1
    )
    fixed = parse_config({**fr, "pretrain": {"method": "semisup", "label_fraction": 5}})
    assert PretrainSlice.of(fixed).label_fraction == 5
    assert PretrainSlice.of(parse_config(fr)).label_fraction is None  # simclr


def test_distill_resolves_the_student_and_its_crop() -> None:
    cfg = parse_config(
        {"model": {"stem_stride": 2, "head_depth": 3}, "distill": {"student": {"width": 0.06}}}
    )
    s = DistillSlice.of(cfg)
    assert (s.student.width, s.student.stem_stride, s.student.head_depth) == (0.06, 2, 3)
    assert s.crop_min_scale == cfg.finetune.crop_min_scale
    own = parse_config({"distill": {"crop_min_scale": 0.9, "student": {"stem_stride": 1}}})
    assert DistillSlice.of(own).crop_min_scale == 0.9
    assert DistillSlice.of(own).student.stem_stride == 1


def test_the_baseline_has_its_rate_and_the_consistency_phase_only_when_asked() -> None:
    raw = {
        "finetune": {
            "label_fractions": [0.1, 1],
            "lr": 1e-3,
            "baseline_lr": {0.1: 0.1, 1: 0.03},
            "consistency": {"epochs": 2},
        }
    }
    cfg = parse_config(raw)
    ft, base = SupervisedSlice.of(cfg), SupervisedSlice.of(cfg, baseline=True)
    assert ft.baseline_lr is None and ft.lr_for(0.1) == 1e-3
    assert base.lr_for(0.1) == 0.1 and base.lr_for(1.0) == 0.03
    with pytest.raises(KeyError, match="no rate for label fraction 5"):
        base.lr_for(5.0)
    assert ft.consistency is not None and ft.consistency.epochs == 2
    assert base.consistency is None
    raw["finetune"]["consistency"]["baseline"] = True  # type: ignore[index]
    assert SupervisedSlice.of(parse_config(raw), baseline=True).consistency is not None


def test_the_key_leaves_out_what_cannot_change_the_result() -> None:
    cfg = load_config("demo")
    pre = PretrainSlice.of(cfg)
    assert pre.knn.knn_k == 200 and "knn" not in pre.key_dict()
    ft = SupervisedSlice.of(cfg).key_dict()
    assert "baseline" not in ft["consistency"] and ft["consistency"]["epochs"] == 3
    shard = ShardSlice.of(cfg)
    assert shard.fractions == (0.1, 1.0)
    assert "fractions" not in shard.key_dict() and "in_memory" not in shard.key_dict()["data"]
    assert EvaluateSlice.of(cfg).key_dict().keys() >= {"seed", "evaluate", "header", "resources"}


def test_resources_are_the_kinds_after_its_overrides() -> None:
    cfg = load_config("demo")  # finetune: 1 CPU and 1 thread; pretraining: 2 and 2
    for kind, n in (("finetune", 1), ("pretrain", 2)):
        res = slice_for(kind, cfg).resources  # type: ignore[attr-defined]
        assert (res.cpus_per_worker, res.torch_threads) == (n, n)
