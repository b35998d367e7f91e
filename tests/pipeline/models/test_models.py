"""pipeline.models (its __init__): models built from the config's model section, classifiers from
a config, model files (save_model / load_model)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig, StudentConfig
from pipeline.models import (
    Classifier,
    ContrastiveModel,
    backbone_from,
    build_classifier_from_config,
    build_contrastive_model,
    load_model,
    save_model,
)


def test_stem_stride_from_config_and_student_default() -> None:
    from pipeline.config import Config
    from pipeline.slices import DistillSlice

    model = build_contrastive_model(ModelConfig(width=0.125, stem_stride=2), in_channels=1)
    assert model.encoder.conv1.stride == (2, 2)
    cfg = Config.model_validate(
        {"model": {"stem_stride": 2}, "distill": {"student": {"width": 0.06}}}
    )
    assert DistillSlice.of(cfg).student.stem_stride == 2  # the teacher's by default
    cfg = Config.model_validate(
        {"model": {"stem_stride": 2}, "distill": {"student": {"width": 0.06, "stem_stride": 1}}}
    )
    assert (
        DistillSlice.of(cfg).student.stem_stride == 1 and DistillSlice.of(cfg).student.width == 0.06
    )
    with pytest.raises(ValueError, match="stem_stride"):
        Config.model_validate({"model": {"stem_stride": 4}})
    with pytest.raises(ValueError, match="CIFAR stem only"):
        Config.model_validate({"model": {"stem_stride": 2, "cifar_stem": False}})


def test_model_config_head_last_bn_builds_the_simclrv2_head(
    small_model: Callable[..., ContrastiveModel],
) -> None:
    from pipeline.models.heads import ScaleOnlyBatchNorm1d

    cfg = ModelConfig(arch="resnet18", width=0.125, head_depth=3, head_last_bn=True)
    model = build_contrastive_model(cfg, 1)
    assert isinstance(model.head.blocks[-1][1], ScaleOnlyBatchNorm1d)
    assert not any(isinstance(m, ScaleOnlyBatchNorm1d) for m in small_model().modules())


def test_classifier_from_config_matches_finetune_network() -> None:
    cfg = ModelConfig(width=0.125, head_depth=3, head_hidden=24)
    clf = build_classifier_from_config(cfg, 1, 7, head_layers=1)
    ref = Classifier(*backbone_from(build_contrastive_model(cfg, 1), 1), 7)
    assert isinstance(clf, Classifier) and clf.feat_dim == 24
    assert {k: v.shape for k, v in clf.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert clf.eval()(torch.randn(2, 1, 12, 12)).shape == (2, 7)
    student = build_classifier_from_config(StudentConfig(arch="resnet18", width=0.125), 1, 5)
    assert student.feat_dim == 64 and student.backbone.head_layers == 0
    with pytest.raises(ValueError):
        build_classifier_from_config(cfg, 1, 7, head_layers=4)
    with pytest.raises(ValueError):
        build_classifier_from_config({"arch": "vgg"}, 1, 7)
    with pytest.raises(ValueError):
        build_classifier_from_config(cfg, 1, 0)


@pytest.mark.parametrize("kind", ["contrastive", "classifier"])
def test_save_load_round_trip(tmp_path, kind: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(width=0.125, head_depth=2, head_hidden=16, head_out=8)
    if kind == "contrastive":
        module: nn.Module = build_contrastive_model(cfg, 1)
        num_classes = None
    else:
        module = build_classifier_from_config(cfg, 1, 4, head_layers=1)
        num_classes = 4
    module.train()(torch.randn(4, 1, 12, 12))  # move BN running stats off their init
    module.eval()
    path = tmp_path / "m.pt"
    save_model(
        path, kind, cfg.model_dump(), 1, num_classes, module.state_dict(), extra={"epoch": 3}
    )
    assert not list(tmp_path.glob("*.tmp"))
    blob = torch.load(path, weights_only=True)
    assert blob["kind"] == kind and blob["extra"] == {"epoch": 3}
    assert blob["head_layers"] == (1 if kind == "classifier" else None)
    loaded = load_model(path)
    assert type(loaded) is type(module) and not loaded.training
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        a, b = module(x), loaded(x)
    if kind == "contrastive":
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_save_model_bad_arguments(tmp_path) -> None:
    cfg = ModelConfig(width=0.125).model_dump()
    sd = build_contrastive_model(cfg, 1).state_dict()
    with pytest.raises(ValueError, match="kind"):
        save_model(tmp_path / "a.pt", "student", cfg, 1, None, sd)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        save_model(tmp_path / "a.pt", "classifier", cfg, 1, None, sd)
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"hello": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a model file"):
        load_model(tmp_path / "junk.pt")
