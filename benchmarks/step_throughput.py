"""Throughput of one SimCLR training step (views/s) and its model-FLOPs utilisation.

One step (SimCLR, arXiv:2002.05709): a batch of N images as two views (2N views, random tensors:
augmentation is not measured) goes through the encoder and projection head in one forward pass,
the NT-Xent loss over the 2N×2N cosine-similarity matrix, backward, and an optimiser step.

Measured twice, interleaved step by step so that load on the shared machine hits both alike:

* ``pipeline``: ``build_contrastive_model`` + ``pipeline.losses.NTXentLoss`` (the inline loss
  below while that package is not importable) + ``build_optimizer`` (LARS by default);
* ``bare``: the same encoder and head modules (copies), the loss written inline and
  ``torch.optim.SGD``, no pipeline helper: the baseline the pipeline should match (ratio ≈ 1).

MFU = 3 × forward FLOPs (``pipeline.models.flops_per_image``: 2 × multiply-adds of conv and
linear layers) × views/s ÷ the measured fp32 peak (best of a few ``torch.mm`` of 2048×2048).

Example::

    python benchmarks/step_throughput.py --arch resnet18 --width 0.25 --size 32 --channels 1 \\
        --batch 256 --steps 3 --threads 2

Prints one JSON line per result; the last is the pipeline step's throughput against the bare loop:
``{"benchmark", "value", "unit", "baseline", "ratio", "machine": {"cores", "torch", "device"}, ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models import (  # noqa: E402
    build_contrastive_model,
    count_params,
    flops_per_image,
)
from pipeline.optim import build_optimizer, scale_lr  # noqa: E402


def nt_xent_inline(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent (arXiv:2002.05709, eq. 1): cross-entropy over the 2N×2N cosine similarities.

    ``z1``, ``z2`` (N, d) -> scalar; view i's positive is its partner i±N, the diagonal is masked.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, d)
    logits = z @ z.T / temperature  # (2N, 2N)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
    return F.cross_entropy(logits, targets)


def pipeline_loss(temperature: float) -> tuple[Callable[[Tensor, Tensor], Tensor], str]:
    """``pipeline.losses.NTXentLoss`` when importable and callable as ``loss(z1, z2)``, else inline."""
    try:
        from pipeline.losses import NTXentLoss  # type: ignore[attr-defined]

        loss = NTXentLoss(temperature=temperature, gather_distributed=False)
        z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
        got = loss(z1, z2)
        if not torch.allclose(got, nt_xent_inline(z1, z2, temperature), atol=1e-5):
            print("note: NTXentLoss differs from the inline NT-Xent", file=sys.stderr)
        return loss, "pipeline.losses.NTXentLoss"
    except Exception as err:  # not written yet, or another call convention
        print(f"note: using the inline NT-Xent ({type(err).__name__}: {err})", file=sys.stderr)
        return (lambda a, b: nt_xent_inline(a, b, temperature)), "inline"


def measure_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 FLOP/s of ``torch.mm`` of two n×n matrices (2·n³ FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--size", type=int, default=32, help="image side (px)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=256, help="images per step (2x views)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-cifar-stem", action="store_true", help="7x7 stride-2 stem + max-pool")
    p.add_argument("--stem-stride", type=int, default=1, choices=[1, 2], help="CIFAR stem stride")
    p.add_argument("--head-depth", type=int, default=2)
    p.add_argument("--head-out", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the modules")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare loop")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("size", "channels", "batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch < 2:
        p.error("--batch must be >= 2 (NT-Xent needs negatives)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        arch=args.arch,
        width=args.width,
        cifar_stem=not args.no_cifar_stem,
        stem_stride=args.stem_stride,
        head_depth=args.head_depth,
        head_out=args.head_out,
        channels_last=args.channels_last,
    )
    model = build_contrastive_model(cfg, args.channels)
    fwd_flops = flops_per_image(model, (args.channels, args.size, args.size))
    n_params = count_params(model)
    lr = scale_lr(0.075, args.batch, "sqrt")
    loss_fn, loss_name = pipeline_loss(args.temperature)

    # ---- bare loop: copies of the same modules, nothing from pipeline -------------------------
    enc, head = copy.deepcopy(model.encoder), copy.deepcopy(model.head)
    bare_params = list(enc.parameters()) + list(head.parameters())
    bare_opt = torch.optim.SGD(bare_params, lr=lr, momentum=0.9, weight_decay=1e-6)

    fwd_model: nn.Module = model
    if args.compile:
        fwd_model = torch.compile(model)
        enc, head = torch.compile(enc), torch.compile(head)
    opt = build_optimizer(args.optimizer, model, lr=lr, weight_decay=1e-6)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if args.bf16
        else contextlib.nullcontext
    )
    mem = torch.channels_last if args.channels_last else torch.contiguous_format
    n, t = args.batch, args.temperature

    def views() -> tuple[Tensor, Tensor]:
        shape = (n, args.channels, args.size, args.size)  # (N, C, H, W) each
        return (
            torch.randn(shape).contiguous(memory_format=mem),
            torch.randn(shape).contiguous(memory_format=mem),
        )

    def pipeline_step(x1: Tensor, x2: Tensor) -> float:
        with autocast():
            _, z = fwd_model(torch.cat([x1, x2]))  # (2N, out)
            loss = loss_fn(z[:n].float(), z[n:].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def bare_step(x1: Tensor, x2: Tensor) -> float:
        x = torch.cat([x1, x2])  # (2N, C, H, W)
        with autocast():
            z = head(enc(x)).float()  # (2N, out)
            z = F.normalize(z, dim=1)
            logits = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
            loss = F.cross_entropy(logits, targets)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()
        return float(loss.detach())

    model.train()
    enc.train()
    head.train()
    for _ in range(args.warmup):
        x1, x2 = views()
        pipeline_step(x1, x2)
        if not args.no_baseline:
            bare_step(x1, x2)
    # Interleaved, the order swapped every step, so that bursts of load hit both variants alike.
    times = {"pipeline": 0.0, "bare": 0.0}
    steps_fns = {"pipeline": pipeline_step, "bare": bare_step}
    for i in range(args.steps):
        x1, x2 = views()
        order = ["pipeline"] if args.no_baseline else (["pipeline", "bare"][:: 1 - 2 * (i % 2)])
        for name in order:
            t0 = time.perf_counter()
            steps_fns[name](x1, x2)
            times[name] += time.perf_counter() - t0
    t_pipe, t_bare = times["pipeline"], times["bare"]
    n_views = 2 * n * args.steps
    v_pipe = n_views / t_pipe
    v_bare = n_views / t_bare if not args.no_baseline else None
    peak = measure_peak_flops()
    achieved = 3.0 * fwd_flops * v_pipe

    machine = {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    setup = {
        "arch": args.arch,
        "width": args.width,
        "cifar_stem": not args.no_cifar_stem,
        "stem_stride": args.stem_stride,
        "size": args.size,
        "channels": args.channels,
        "batch": n,
        "steps": args.steps,
        "optimizer": args.optimizer,
        "channels_last": args.channels_last,
        "bf16": args.bf16,
        "compile": args.compile,
        "loss": loss_name,
        "params": n_params,
        "fwd_flops_per_image": fwd_flops,
    }

    def line(name: str, value: float, unit: str, baseline: float | None) -> dict[str, Any]:
        return {
            "benchmark": name,
            "value": round(value, 4),
            "unit": unit,
            "baseline": None if baseline is None else round(baseline, 4),
            "ratio": None if not baseline else round(value / baseline, 4),
            "machine": machine,
            "setup": setup,
        }

    results = [line("matmul_fp32_peak", peak / 1e9, "GFLOP/s", None)]
    if v_bare is not None:
        results.append(line("simclr_step_bare", v_bare, "views/s", None))
    results.append(line("simclr_step_mfu", achieved / 1e9, "GFLOP/s", peak / 1e9))
    results.append(line("simclr_step_throughput", v_pipe, "views/s", v_bare))
    for r in results:
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
