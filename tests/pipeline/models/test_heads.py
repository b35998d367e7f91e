"""pipeline.models.heads: projection heads (SimCLR and SimCLRv2), the contrastive model, backbones
of the encoder plus the first head layers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import (
    ContrastiveModel,
    ProjectionHead,
    backbone_from,
    build_contrastive_model,
    build_encoder,
    count_params,
)


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


@pytest.mark.parametrize(
    "args", [(0, 8, 8, 2), (8, 0, 8, 2), (8, 8, 0, 2), (8, 8, 8, 0), (8, 8, 8, 5), (8, 8, 8, 2.0)]
)
def test_projection_head_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        ProjectionHead(*args)


def test_contrastive_model_forward(small_model: Callable[..., ContrastiveModel]) -> None:
    model = small_model().eval()
    x = torch.randn(3, 1, 16, 16)
    h, z = model(x)
    assert h.shape == (3, 64) and z.shape == (3, 10)
    assert not torch.allclose(z.norm(dim=1), torch.ones(3))  # not normalised
    cfg = ModelConfig(width=0.125, head_hidden=None, head_depth=2)
    assert build_contrastive_model(cfg, 3).head.hidden_dim == 64  # None -> encoder width
    with pytest.raises(ValueError, match="does not match"):
        ContrastiveModel(build_encoder("resnet18", 0.125), ProjectionHead(32, 8, 8, 2))


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_backbone_from_shapes_and_weights(
    small_model: Callable[..., ContrastiveModel], j: int
) -> None:
    torch.manual_seed(0)
    model = small_model(depth=3).eval()
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


def test_backbone_from_bad_j(small_model: Callable[..., ContrastiveModel]) -> None:
    model = small_model(depth=2)
    for j in (-1, 3, 1.0):
        with pytest.raises(ValueError):
            backbone_from(model, j)  # type: ignore[arg-type]
