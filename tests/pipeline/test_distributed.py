"""Distributed contrastive loss: 2 gloo processes on CPU give the 1-process loss and gradients.

GUIDE "Distributed loss": each worker gathers the embeddings of all workers with an autograd-aware
all-gather and scores its own anchors against every view (SimCLR arXiv:2002.05709, SupCon
arXiv:2004.11362). A tiny Linear -> BatchNorm1d (converted to Global/Sync BN) -> ReLU -> Linear
model, wrapped in DistributedDataParallel, is trained one step on a fixed batch split over 2 ranks;
the mean of the per-rank losses and the DDP-averaged parameter gradients must equal the loss and
gradients of one process on the joined batch. The same run with a gather that keeps only the local
slice differentiable (the common bug) must not.
"""

from __future__ import annotations

import importlib
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.distributed import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    gather_no_grad,
    gather_sizes,
    gather_with_grad,
    rank_and_world,
)
from pipeline.losses import NTXentLoss, SupConLoss

# importlib, not `import pipeline.losses.supcon as m`: the package attribute `supcon` is the
# function, which shadows the submodule of the same name in an `import ... as` statement.
ntxent_mod = importlib.import_module("pipeline.losses.ntxent")
supcon_mod = importlib.import_module("pipeline.losses.supcon")

WORLD = 2
N, V, D_IN = 8, 2, 6
LABELS = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1])
SEMI = torch.tensor([0, -1, 0, 2, -1, -1, 0, 1])
# name -> (loss kind, labels, rows of rank 0 (rank 1 takes the rest))
CASES: dict[str, tuple[str, torch.Tensor | None, int]] = {
    "ntxent": ("ntxent", None, 4),
    "supcon": ("supcon", LABELS, 4),
    "semisup": ("supcon", SEMI, 4),
    "semisup_uneven": ("supcon", SEMI, 5),
}
TOL = {"rtol": 1e-4, "atol": 1e-5}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def make_bn2d() -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return bn


def make_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return 3 + 2 * torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)


def make_batch() -> torch.Tensor:
    return torch.randn(N, V, D_IN, generator=torch.Generator().manual_seed(1))  # (N, V, D_IN)


def step(net: nn.Module, x: torch.Tensor, kind: str, labels: torch.Tensor | None) -> torch.Tensor:
    """Forward all views in one batch (as the pretrain stage does) and return the loss."""
    n = x.shape[0]
    z = net(x.transpose(0, 1).reshape(V * n, D_IN))  # (V·n, 4), view-major
    z = z.view(V, n, -1).transpose(0, 1)  # (n, V, 4)
    if kind == "ntxent":
        return NTXentLoss(temperature=0.5)(z[:, 0], z[:, 1])
    return SupConLoss(temperature=0.2)(z, labels)


def naive_gather(x: torch.Tensor, sizes: list[int] | None = None, group=None) -> torch.Tensor:
    """The known bug: all_gather without grad, own slice re-inserted; no backward all-reduce."""
    rank, world = rank_and_world()
    sizes = sizes or gather_sizes(x.shape[0])
    pad = x.new_zeros((max(sizes), *x.shape[1:]))
    pad[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    parts = [p[:s] for p, s in zip(parts, sizes, strict=True)]
    parts[rank] = x
    return torch.cat(parts)


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        assert rank_and_world() == (rank, WORLD)
        # plain gathers, uneven sizes
        local = torch.arange(rank + 2)  # rank 0: [0, 1], rank 1: [0, 1, 2]
        assert gather_sizes(len(local)) == [2, 3]
        assert gather_no_grad(local).tolist() == [0, 1, 0, 1, 2]
        x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
        g = gather_with_grad(x)  # (3, 2)
        (g * torch.arange(1.0, 4.0)[:, None]).sum().backward()
        # grad of sum_r (g·w).sum() w.r.t. own rows: world × w at those rows
        expected = WORLD * torch.arange(1.0, 4.0)[sum(range(1, rank + 1)) :][: rank + 1]
        assert torch.equal(x.grad, expected[:, None].expand(-1, 2)), x.grad

        results: dict[str, dict] = {}
        # Global BN on 4-D input (N, C, H, W), uneven split 3 / 1
        lo, hi = (0, 3) if rank == 0 else (3, 4)
        bn = convert_sync_batchnorm(make_bn2d())
        img, weight = make_images()
        img = img[lo:hi].clone().requires_grad_(True)
        out = bn(img)
        (out * weight[lo:hi]).sum().backward()
        dist.all_reduce(bn.weight.grad)  # the loss is the sum over ranks: sum the grads
        dist.all_reduce(bn.bias.grad)
        results["bn2d"] = {
            "out": out.detach(),
            "x_grad": img.grad,
            "w_grad": bn.weight.grad,
            "b_grad": bn.bias.grad,
            "running_var": bn.running_var.clone(),
        }
        xb = make_batch()
        for name, (kind, labels, split) in CASES.items():
            lo, hi = (0, split) if rank == 0 else (split, N)
            for mode in ("ours", "naive"):
                if mode == "naive":
                    ntxent_mod.gather_with_grad = naive_gather
                    supcon_mod.gather_with_grad = naive_gather
                model = convert_sync_batchnorm(make_model())
                assert isinstance(model[1], SyncBatchNorm)
                net = nn.parallel.DistributedDataParallel(model)
                loss = step(net, xb[lo:hi], kind, None if labels is None else labels[lo:hi])
                loss.backward()  # DDP all-reduces and averages the parameter gradients
                results[f"{name}/{mode}"] = {
                    "loss": loss.item(),
                    "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                    "running": (model[1].running_mean.clone(), model[1].running_var.clone()),
                }
                ntxent_mod.gather_with_grad = gather_with_grad
                supcon_mod.gather_with_grad = gather_with_grad
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_helpers_are_no_ops() -> None:
    assert rank_and_world() == (0, 1)
    model = make_model()
    assert convert_sync_batchnorm(model) is model
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x
    assert gather_sizes(3) == [3]


def _spawn_ranks(worker, tmp_path: Path, monkeypatch, stem: str) -> list[dict]:
    """Run ``worker(rank, out_dir)`` on WORLD gloo processes; the dict each saved as STEM{rank}.pt."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{stem}{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(180)
def test_two_gloo_ranks_match_one_process(tmp_path: Path, monkeypatch) -> None:
    ranks = _spawn_ranks(_worker, tmp_path, monkeypatch, "rank")

    bn = make_bn2d()
    img, weight = make_images()
    img.requires_grad_(True)
    out = bn(img)
    (out * weight).sum().backward()
    got = [r["bn2d"] for r in ranks]
    torch.testing.assert_close(torch.cat([g["out"] for g in got]), out.detach(), **TOL)
    torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), img.grad, **TOL)
    for g in got:
        torch.testing.assert_close(g["w_grad"], bn.weight.grad, **TOL)
        torch.testing.assert_close(g["b_grad"], bn.bias.grad, **TOL)
        torch.testing.assert_close(g["running_var"], bn.running_var, **TOL)

    xb = make_batch()
    for name, (kind, labels, _) in CASES.items():
        model = make_model()
        ref_loss = step(model, xb, kind, labels)
        ref_loss.backward()
        ref_grads = {k: p.grad for k, p in model.named_parameters()}

        ours = [r[f"{name}/ours"] for r in ranks]
        mean_loss = sum(r["loss"] for r in ours) / WORLD
        assert abs(mean_loss - ref_loss.item()) < 1e-5, (name, mean_loss, ref_loss.item())
        for r in ours:
            for k, g in ref_grads.items():
                torch.testing.assert_close(r["grads"][k], g, **TOL, msg=f"{name} grad {k}")
            # Global BN: running statistics as over the joined batch
            torch.testing.assert_close(r["running"][0], model[1].running_mean, **TOL)
            torch.testing.assert_close(r["running"][1], model[1].running_var, **TOL)

        # The bug this avoids: without the backward all-reduce the cross-rank terms are lost.
        # The loss value is unchanged, the gradient is not.
        naive = ranks[0][f"{name}/naive"]
        assert abs(sum(r[f"{name}/naive"]["loss"] for r in ranks) / WORLD - ref_loss.item()) < 1e-5
        err = max((naive["grads"][k] - g).abs().max().item() for k, g in ref_grads.items())
        scale = max(g.abs().max().item() for g in ref_grads.values())
        assert err > 0.05 * scale, (name, err, scale)


def test_supcon_gather_distributed_flag_ignored_in_one_process() -> None:
    feats = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        SupConLoss(0.2, gather_distributed=True)(feats),
        SupConLoss(0.2, gather_distributed=False)(feats),
    )


class _DDPContext:
    """A TrainContext for one gloo rank: DDP-wrapped model, checkpoints kept in memory."""

    def __init__(self, rank: int) -> None:
        self.rank, self.world_size, self.device = rank, WORLD, torch.device("cpu")
        self.reports: list[dict] = []

    def report(self, metrics, checkpoint=None) -> None:
        self.reports.append(dict(metrics))

    def load_checkpoint(self):
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(model)


def _consistency_worker(rank: int, out_dir: str) -> None:
    from pipeline.config import ConsistencyConfig
    from pipeline.data.transforms import BatchTwoViewAugment
    from pipeline.stages.consistency import ConsistencyPlan, UnlabeledMemory, fit_consistency
    from pipeline.stages.supervised import InMemory

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = convert_sync_batchnorm(
            nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
            )
        )
        model(torch.zeros(2, 1, 8, 8))  # materialise the lazy layer identically on both ranks
        g = torch.Generator().manual_seed(1)
        unlabeled = torch.randint(0, 256, (31, 1, 8, 8), dtype=torch.uint8, generator=g)
        labeled = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g)
        aug = BatchTwoViewAugment(size=8, channels=1, strength=1.0, crop_min_scale=1.0)
        ctx = _DDPContext(rank)
        # 31 images, 4 per rank and step: rank 0's strided share (16) holds 4 batches, rank 1's
        # (15) only 3. Both must take 3 steps, or rank 0 waits forever in its 4th all-reduce.
        cfg = ConsistencyConfig(epochs=1, batch_size=8, labeled_batch_size=4, threshold=0.34)
        hist = fit_consistency(
            model,
            InMemory(labeled, (torch.tensor([0, 1, 2, 0, 1]),), aug.single),
            UnlabeledMemory(unlabeled, None, aug.single, aug.single),
            ConsistencyPlan.from_config(cfg),
            ctx,
            history=[],
        )
        torch.save(
            {"hist": hist, "state": {k: v.clone() for k, v in model.state_dict().items()}},
            Path(out_dir) / f"consistency{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_consistency_phase_on_two_gloo_ranks_stays_in_step(tmp_path: Path, monkeypatch) -> None:
    ranks = _spawn_ranks(_consistency_worker, tmp_path, monkeypatch, "consistency")
    for r in ranks:
        assert [h["consistency_epoch"] for h in r["hist"]] == [1]
        assert r["hist"][0]["images_per_s"] > 0
    # DDP averaged every step's gradients: the replicas end identical.
    for k, v in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][k], v, msg=k)
