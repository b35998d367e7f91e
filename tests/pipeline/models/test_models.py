"""pipeline.models: encoders, heads, backbones, classifiers, model files, params and FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig, StudentConfig
from pipeline.models import (
    Classifier,
    ContrastiveModel,
    ProjectionHead,
    backbone_from,
    build_classifier_from_config,
    build_contrastive_model,
    build_encoder,
    count_params,
    flops_per_image,
    load_model,
    save_model,
    to_channels_last,
)

torch.set_num_threads(1)

ENCODER_CASES = [
    (arch, width, stem, ch)
    for arch in ("resnet18", "resnet34")
    for width in (0.25, 0.5)
    for stem in (True, False)
    for ch in (1, 3)
] + [("resnet50", 0.25, stem, ch) for stem in (True, False) for ch in (1, 3)]


def _expected_out_dim(arch: str, width: float) -> int:
    return max(8, round(512 * width)) * (4 if arch == "resnet50" else 1)


@pytest.mark.parametrize(("arch", "width", "stem", "ch"), ENCODER_CASES)
def test_encoder_output_shape(arch: str, width: float, stem: bool, ch: int) -> None:
    torch.manual_seed(0)
    enc = build_encoder(arch, width=width, cifar_stem=stem, in_channels=ch).eval()
    assert enc.out_dim == _expected_out_dim(arch, width)
    assert not any(isinstance(m, nn.Linear) for m in enc.modules())  # fc removed
    x = torch.randn(1, ch, 28, 28) if ch == 1 else torch.randn(2, ch, 32, 32)
    with torch.no_grad():
        h = enc(x)
    assert h.shape == (x.shape[0], enc.out_dim)
    assert torch.isfinite(h).all()


def test_encoder_stems_and_widths() -> None:
    cifar = build_encoder("resnet18", 0.25, cifar_stem=True, in_channels=1)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert cifar.conv1.in_channels == 1 and cifar.conv1.out_channels == 16  # 64 * 0.25
    assert cifar.stage_planes == [16, 32, 64, 128]
    imagenet = build_encoder("resnet18", 0.25, cifar_stem=False)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    tiny = build_encoder("resnet18", 0.05)  # every stage at least 8 channels
    assert tiny.conv1.out_channels == 8 and tiny.stage_planes == [8, 8, 13, 26]
    full = build_encoder("resnet18", 1.0)
    assert full.out_dim == 512 and full.stage_planes == [64, 128, 256, 512]
    # the same layout as torchvision's resnet18 apart from the stem and fc
    import torchvision

    ref = torchvision.models.resnet18()
    assert count_params(full) == count_params(ref) - count_params(ref.fc) - (
        ref.conv1.weight.numel() - full.conv1.weight.numel()
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "resnet101"},
        {"width": 0.0},
        {"width": -1.0},
        {"in_channels": 0},
        {"in_channels": 2.5},
        {"stem_stride": 3},
        {"stem_stride": 2, "cifar_stem": False},
    ],
)
def test_encoder_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_encoder(**kwargs)


def test_stem_stride_two_quarters_the_positions_with_the_same_parameters() -> None:
    torch.manual_seed(0)
    s1 = build_encoder("resnet18", 0.125, in_channels=1)
    s2 = build_encoder("resnet18", 0.125, in_channels=1, stem_stride=2)
    assert s2.conv1.stride == (2, 2) and s2.stem_stride == 2 and "stem_stride=2" in repr(s2)
    assert count_params(s1) == count_params(s2)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert s1.layer1(s1.relu(s1.bn1(s1.conv1(x)))).shape[-2:] == (28, 28)
        assert s2.layer1(s2.relu(s2.bn1(s2.conv1(x)))).shape[-2:] == (14, 14)
        assert s2(x).shape == (2, s2.out_dim)
    assert flops_per_image(s2, (1, 28, 28)) < 0.3 * flops_per_image(s1, (1, 28, 28))


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


def test_encoder_rejects_wrong_channels() -> None:
    enc = build_encoder("resnet18", 0.125, in_channels=1)
    with pytest.raises(ValueError, match="expected input"):
        enc(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_projection_head_structure(depth: int) -> None:
    head = ProjectionHead(16, 12, 8, depth)
    assert len(head.blocks) == depth
    assert head.dims == [16] + [12] * (depth - 1) + [8]
    for i, block in enumerate(head.blocks):
        kinds = [type(m) for m in block]
        if i < depth - 1:
            assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
            assert block[0].out_features == 12
        else:
            assert kinds == [nn.Linear]  # no BN, no ReLU after the last layer
            assert block[0].out_features == 8
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == depth
    z = head(torch.randn(4, 16))
    assert z.shape == (4, 8)
    assert (z < 0).any()  # no ReLU at the end: z can be negative


@pytest.mark.parametrize("depth", [1, 3])
def test_projection_head_simclrv2_last_layer(depth: int) -> None:
    """SimCLRv2's last head layer: a bias-free Linear, then batch norm with a scale and no shift,
    no ReLU; the shift stays zero through training and survives SyncBatchNorm conversion."""
    from pipeline.models.heads import ScaleOnlyBatchNorm1d

    head = ProjectionHead(16, 12, 8, depth, last_bn=True)
    last = head.blocks[-1]
    assert [type(m) for m in last] == [nn.Linear, ScaleOnlyBatchNorm1d]
    assert last[0].bias is None
    names = {n for n, _ in head.named_parameters()}
    assert f"blocks.{depth - 1}.1.weight" in names
    assert not any(n.startswith(f"blocks.{depth - 1}.1.") and "bias" in n for n in names)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    x = torch.randn(32, 16) + 3.0
    for _ in range(3):  # trained towards a target with non-zero mean: no shift can learn it
        loss = (head(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(last[1].weight.detach(), torch.ones(8))  # the scale does learn
    z = head.train()(torch.randn(64, 16))
    # batch norm without a shift: each output feature has zero mean over the batch
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    assert isinstance(sync.blocks[-1][1].bn, nn.SyncBatchNorm)
    state = head.state_dict()
    again = ProjectionHead(16, 12, 8, depth, last_bn=True)
    again.load_state_dict(state)


def test_model_config_head_last_bn_builds_the_simclrv2_head() -> None:
    from pipeline.models.heads import ScaleOnlyBatchNorm1d

    cfg = ModelConfig(arch="resnet18", width=0.125, head_depth=3, head_last_bn=True)
    model = build_contrastive_model(cfg, 1)
    assert isinstance(model.head.blocks[-1][1], ScaleOnlyBatchNorm1d)
    assert not any(isinstance(m, ScaleOnlyBatchNorm1d) for m in _small_model().modules())


@pytest.mark.parametrize(
    "args", [(0, 8, 8, 2), (8, 0, 8, 2), (8, 8, 0, 2), (8, 8, 8, 0), (8, 8, 8, 5), (8, 8, 8, 2.0)]
)
def test_projection_head_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        ProjectionHead(*args)


def _small_model(depth: int = 3, channels: int = 1) -> ContrastiveModel:
    cfg = ModelConfig(arch="resnet18", width=0.125, head_depth=depth, head_hidden=24, head_out=10)
    return build_contrastive_model(cfg, channels)


def test_contrastive_model_forward() -> None:
    model = _small_model().eval()
    x = torch.randn(3, 1, 16, 16)
    h, z = model(x)
    assert h.shape == (3, 64) and z.shape == (3, 10)
    assert not torch.allclose(z.norm(dim=1), torch.ones(3))  # not normalised
    cfg = ModelConfig(width=0.125, head_hidden=None, head_depth=2)
    assert build_contrastive_model(cfg, 3).head.hidden_dim == 64  # None -> encoder width
    with pytest.raises(ValueError, match="does not match"):
        ContrastiveModel(build_encoder("resnet18", 0.125), ProjectionHead(32, 8, 8, 2))


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_backbone_from_shapes_and_weights(j: int) -> None:
    torch.manual_seed(0)
    model = _small_model(depth=3).eval()
    backbone, feat_dim = backbone_from(model, j)
    assert feat_dim == [64, 24, 24, 10][j]
    assert backbone.out_dim == feat_dim and backbone.head_layers == j
    x = torch.randn(2, 1, 16, 16)
    backbone.eval()
    with torch.no_grad():
        out = backbone(x)
        h, z = model(x)
    assert out.shape == (2, feat_dim)
    if j == 0:
        torch.testing.assert_close(out, h)
    if j == 3:
        torch.testing.assert_close(out, z)
    # copies of the source's weights, not shared tensors
    src = model.state_dict()
    for k, v in backbone.state_dict().items():
        if k.startswith("encoder."):
            ref = src[k]
        else:
            i, rest = k.split(".", 1)
            ref = src[f"head.blocks.{i.removeprefix('head_')}.{rest}"]
        torch.testing.assert_close(v, ref)
        assert v.data_ptr() != ref.data_ptr()
    n_head = sum(count_params(b) for b in list(model.head.blocks)[:j])
    assert count_params(backbone) == count_params(model.encoder) + n_head


def test_backbone_from_bad_j() -> None:
    model = _small_model(depth=2)
    for j in (-1, 3, 1.0):
        with pytest.raises(ValueError):
            backbone_from(model, j)  # type: ignore[arg-type]


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


def test_count_params() -> None:
    model = _small_model()
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    model.encoder.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model.head)


def test_flops_single_layers() -> None:
    lin = nn.Linear(10, 7)
    assert flops_per_image(lin, (10,)) == 2 * 10 * 7
    conv = nn.Conv2d(3, 5, kernel_size=3, stride=1, padding=1)
    assert flops_per_image(conv, (3, 8, 8)) == 2 * (5 * 8 * 8) * 3 * 3 * 3
    grouped = nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1, groups=2)
    assert flops_per_image(grouped, (4, 8, 8)) == 2 * (8 * 4 * 4) * (4 // 2) * 9
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert flops_per_image(seq, (1, 6, 6)) == 2 * (2 * 16 * 9) + 2 * 32 * 3
    with pytest.raises(ValueError):
        flops_per_image(lin, (0,))


def test_flops_model_keeps_training_mode() -> None:
    model = _small_model().train()
    f = flops_per_image(model, (1, 16, 16))
    assert model.training
    # stem conv alone: 2 * (8 * 16 * 16) * 1 * 9
    assert f > 2 * 8 * 16 * 16 * 9


def test_channels_last() -> None:
    enc = to_channels_last(build_encoder("resnet18", 0.125, in_channels=3))
    assert enc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert enc.eval()(x).shape == (2, 64)
    cfg = ModelConfig(width=0.125, channels_last=True)
    m = build_contrastive_model(cfg, 3)
    assert m.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
