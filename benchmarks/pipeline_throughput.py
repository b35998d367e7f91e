"""Pretraining throughput inside the pipeline vs a bare PyTorch loop; data path; precision; sharding.

Every result is one JSON line (``benchmark``, ``value``, ``unit``, ``baseline``, ``ratio``,
``machine``; see ``_common.emit``):

* ``pretrain_pipeline_w<N>`` (views/s): the real pretrain stage ``pipeline.stages.pretrain.run``
  executed on Ray by ``workflows.train.run_training_stage`` (1 worker: a Ray task; 2: a Ray Train
  ``TorchTrainer``, gloo), reading the WebDataset shards and augmenting with the batched two-view
  path; the rate is the stage's own per-epoch ``views_per_s`` (epoch 1 left out as warm-up)
  against the same model, batch, optimiser and loss in a bare PyTorch loop on pre-augmented
  tensors, measured for the same number of steps right before and after each pipeline run
  (pooled); ``--repeats`` runs, the median ratio reported, all of them listed. Goal: >= 0.95.
* ``data_path`` (views/s): read + decode the train shards into memory, then batched two-view
  augmentation, per image, against the bare step's consumption (views/s). Goal: >= 1.5.
* ``pretrain_step_mfu`` (GFLOP/s): 3 x forward FLOPs x views/s of the bare fp32 step against the
  measured fp32 matrix-product peak (ratio = MFU).
* ``pretrain_step_channels_last`` / ``_bf16`` / ``_compile`` (views/s): the same bare step with
  that one change against the default fp32 NCHW eager step, interleaved step by step; compile runs
  in a child process under ``--compile-timeout`` and reports ``failed: ...`` when it does not work.
* ``shard_ray_1_worker`` / ``shard_ray_2_workers`` (images/s, shard writing only, source load
  excluded): ``workflows.sharding`` Ray tasks over ``ray.init(num_cpus=2)``, one task at a time
  (``ray_map(num_cpus=2)``) vs two (``ray_map(num_cpus=1)``); the 1-worker line's baseline is the
  builtin ``map`` in this process.

Model, batch and optimiser are those of ``workflows/configs/demo.yaml`` (ResNet-18 at its width,
28 px Fashion-MNIST, batch 256, AdamW) with ``pretrain.method=simclr`` and ``knn_every=0``;
``--dataset digits`` when Fashion-MNIST is not installed (chosen automatically then).

    python benchmarks/pipeline_throughput.py                      # all parts, a few minutes
    python benchmarks/pipeline_throughput.py --parts pipeline --workers 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    bare_simclr_step,
    emit,
    measure_peak_flops,
    timed,
)

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data import dataset_info, load_split  # noqa: E402
from pipeline.data.transforms import BatchTwoViewAugment  # noqa: E402
from pipeline.models import build_contrastive_model, flops_per_image  # noqa: E402
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage  # noqa: E402

PARTS = ("pipeline", "data", "variants", "sharding")
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default=None,
                   help="default: fashion-mnist when installed, else digits")  # fmt: skip
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--max-train", type=int, default=12000, help="train images for pretraining")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3, help="pipeline epochs; the first is warm-up")
    p.add_argument("--steps-per-epoch", type=int, default=40,
                   help="pretrain.max_steps_per_epoch (fewer when the train images run out)")  # fmt: skip
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pipeline workers")
    p.add_argument("--repeats", type=int, default=3,
                   help="pipeline runs per worker count, each between two bare windows; median")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="CPU cores used (Ray num_cpus, torch)")
    p.add_argument("--aug-batches", type=int, default=8, help="batches for the data path")
    p.add_argument("--variant-steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--compile-timeout", type=float, default=420.0, help="seconds")
    p.add_argument("--shard-max-train", type=int, default=20000,
                   help="train images for the sharding runs (test: all 10k)")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--shard-repeats", type=int, default=2, help="best of N runs per setting")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra config override, e.g. model.width=0.25")  # fmt: skip
    p.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dataset is None:
        args.dataset = "fashion-mnist" if FMNIST.exists() else "digits"
    if args.epochs < 1 or args.steps_per_epoch < 1 or args.repeats < 1 or args.batch < 2:
        p.error("--epochs, --steps-per-epoch, --repeats must be >= 1 and --batch >= 2")
    return args


def bench_config(args: argparse.Namespace, root: str, **extra: Any) -> Config:
    sets = [
        f"data.source={args.dataset}",
        f"data.max_train={args.max_train}",
        "data.max_test=500",
        "pretrain.method=simclr",
        "pretrain.pseudo_label_from_epoch=0",  # semisup only (the demo's), and not a train step
        "pretrain.knn_every=0",
        f"pretrain.epochs={args.epochs}",
        f"pretrain.batch_size={args.batch}",
        f"pretrain.max_steps_per_epoch={args.steps_per_epoch}",
        "resources.num_workers=1",
        f"resources.cpus_per_worker={args.threads}",
        f"resources.torch_threads={args.threads}",
        f"storage.root={root}",
        "tracking.enabled=false",
        *args.overrides,
        *(f"{k}={v}" for k, v in extra.items()),
    ]
    return load_config("demo", sets)


def setup_of(cfg: Config, size: int, channels: int) -> dict[str, Any]:
    m = cfg.model
    return {
        "dataset": cfg.data.source,
        "arch": m.arch,
        "width": m.width,
        "size": size,
        "channels": channels,
        "batch": cfg.pretrain.batch_size,
        "optimizer": cfg.pretrain.optimizer,
        "method": cfg.pretrain.method,
        "channels_last": m.channels_last,
    }


# -- the bare loop on pre-augmented tensors -----------------------------------------------------


class Bare:
    """The bare baseline: the pipeline's modules (fresh copies), the inline NT-Xent, AdamW, on a
    few batches augmented once beforehand; rates pooled over every call of :meth:`measure`."""

    def __init__(self, cfg: Config, images: torch.Tensor, size: int) -> None:
        c = images.shape[1]
        n = cfg.pretrain.batch_size
        aug = BatchTwoViewAugment(
            size=size,
            channels=c,
            strength=cfg.augment.strength,
            crop_min_scale=cfg.augment.crop_min_scale,
        )
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for i in range(min(4, max(1, len(images) // n))):
            v1, v2 = aug(images[i * n : (i + 1) * n], g)
            self.batches.append(torch.cat([v1, v2]))  # (2N, C, S, S)
        model = build_contrastive_model(cfg.model, in_channels=c)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        p = cfg.pretrain
        self.step = bare_simclr_step(
            model.encoder,
            model.head,
            n,
            temperature=p.temperature,
            optimizer=p.optimizer,
            lr=p.lr or 1e-3,
            weight_decay=p.weight_decay,
            channels_last=cfg.model.channels_last,
        )
        self.step(self.batches[0])  # warm-up
        self.views, self.seconds = 0, 0.0

    def measure(self, steps: int) -> float:
        for i in range(steps):
            x = self.batches[i % len(self.batches)]
            dt, _ = timed(lambda x=x: self.step(x))
            self.seconds += dt
            self.views += x.shape[0]
        return self.rate

    @property
    def rate(self) -> float:
        return self.views / max(self.seconds, 1e-9)


def pipeline_rate(history: list[dict[str, Any]]) -> tuple[float, int]:
    """Views/s over the epochs after the first (all of them when there is only one)."""
    hist = history[1:] if len(history) > 1 else history
    views = sum(h["views_per_s"] * h["epoch_seconds"] for h in hist)
    secs = sum(h["epoch_seconds"] for h in hist)
    return views / max(secs, 1e-9), len(hist)


def run_pipeline_part(args, cfg, ds, tmp, bare: Bare, setup) -> None:
    """Each repeat brackets one pipeline run with bare-loop windows of the same step count (before
    and after, pooled) and takes the ratio of the two; the median repeat is reported, so a burst of
    load from another tenant that hits one run shows in ``ratios`` rather than in the result."""
    import statistics

    from pipeline.stages import pretrain
    from workflows.train import run_training_stage

    # the stage's real epoch length: max_steps_per_epoch, or fewer when the images run out
    steps = min(args.steps_per_epoch, setup["train_images"] // args.batch)
    timed_steps = steps * max(1, args.epochs - 1)
    for w in args.workers:
        wcfg = cfg.model_copy(deep=True)
        wcfg.resources.num_workers = w
        wcfg.resources.cpus_per_worker = args.threads / w
        wcfg.resources.torch_threads = max(1, args.threads // w)
        reps: list[dict[str, Any]] = []
        note = None
        for rep in range(args.repeats):
            out = Path(tmp) / f"pretrain_w{w}_r{rep}" / "out"
            v0, s0 = bare.views, bare.seconds
            bare.measure(timed_steps)  # before
            try:
                t, res = timed(
                    lambda wcfg=wcfg, out=out, w=w: run_training_stage(
                        pretrain.run, wcfg, {"dataset": ds}, str(out), num_workers=w
                    )
                )
            except Exception as err:  # report, go on with the other parts
                note = f"failed: {type(err).__name__}: {str(err).splitlines()[0]}"
                break
            bare.measure(timed_steps)  # after: load bursts hit both sides alike
            base = (bare.views - v0) / max(bare.seconds - s0, 1e-9)
            rate, n_epochs = pipeline_rate(res.history)
            reps.append({"rate": rate, "base": base, "ratio": rate / base, "wall": t,
                         "epochs": [round(h["views_per_s"], 1) for h in res.history]})  # fmt: skip
        if not reps:
            emit(f"pretrain_pipeline_w{w}", None, "views/s", bare.rate, note=note, setup=setup)
            continue
        mid = sorted(reps, key=lambda r: r["ratio"])[(len(reps) - 1) // 2]  # the median repeat
        emit(
            f"pretrain_pipeline_w{w}",
            mid["rate"],
            "views/s",
            mid["base"],
            goal=">= 0.95",
            workers=w,
            executor="ray task" if w == 1 else "ray train TorchTrainer (gloo)",
            repeats=len(reps),
            ratios=[round(r["ratio"], 4) for r in reps],
            ratio_mean=round(statistics.fmean(r["ratio"] for r in reps), 4),
            epochs_timed=n_epochs,
            steps_per_epoch=steps,
            per_epoch_views_per_s=mid["epochs"],
            stage_wall_s=round(mid["wall"], 2),
            bare_steps_per_window=timed_steps,
            note=note,
            setup=setup,
        )


def run_data_part(args, cfg, ds, size, bare: Bare, setup) -> None:
    t_read, (imgs, _, _) = timed(lambda: load_split(ds, "train"))
    n = cfg.pretrain.batch_size
    aug = BatchTwoViewAugment(
        size=size,
        channels=imgs.shape[1],
        strength=cfg.augment.strength,
        crop_min_scale=cfg.augment.crop_min_scale,
    )
    g = torch.Generator().manual_seed(1)
    aug(imgs[:n], g)  # warm-up
    n_batches = max(1, min(args.aug_batches, len(imgs) // n))
    t_aug = 0.0
    for i in range(args.aug_batches):
        j = i % n_batches
        dt, _ = timed(lambda j=j: aug(imgs[j * n : (j + 1) * n], g))
        t_aug += dt
    per_image = t_read / len(imgs) + t_aug / (args.aug_batches * n)
    data_rate = 2.0 / per_image
    if bare.views == 0:
        bare.measure(args.steps_per_epoch)
    emit(
        "data_path",
        data_rate,
        "views/s",
        bare.rate,
        goal=">= 1.5",
        read_decode_images_per_s=round(len(imgs) / t_read, 1),
        augment_views_per_s=round(2 * args.aug_batches * n / t_aug, 1),
        images_read=len(imgs),
        note="read+decode every image once per epoch (the stage decodes once per run) + batched "
        "two-view augmentation; baseline = the bare train step's consumption",
        setup=setup,
    )


# -- precision / layout / compile variants of the step ----------------------------------------


def _variant_steps(cfg: Config, bare: Bare, names: list[str]) -> dict[str, Any]:
    """A step function per variant, each on its own copy of the same initial model."""
    c = bare.batches[0].shape[1]
    base = build_contrastive_model(cfg.model, in_channels=c)
    p = cfg.pretrain
    steps = {}
    for name in names:
        m = copy.deepcopy(base)
        cl = name == "channels_last"
        if cl:
            m = m.to(memory_format=torch.channels_last)
        enc, head = m.encoder, m.head
        if name == "compile":
            enc, head = torch.compile(enc), torch.compile(head)
        steps[name] = bare_simclr_step(
            enc,
            head,
            p.batch_size,
            temperature=p.temperature,
            optimizer=p.optimizer,
            lr=p.lr or 1e-3,
            weight_decay=p.weight_decay,
            channels_last=cl,
            bf16=name == "bf16",
        )
    return steps


def interleaved_rates(cfg: Config, bare: Bare, names: list[str], steps: int) -> dict[str, float]:
    fns = _variant_steps(cfg, bare, names)
    for fn in fns.values():  # warm-up (compiles)
        fn(bare.batches[0])
    secs = dict.fromkeys(names, 0.0)
    views = 0
    for i in range(steps):
        x = bare.batches[i % len(bare.batches)]
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            dt, _ = timed(lambda name=name, x=x: fns[name](x))
            secs[name] += dt
        views += x.shape[0]
    return {k: views / v for k, v in secs.items()}


def run_variants_part(args, cfg, images, size, bare: Bare, setup) -> None:
    c = images.shape[1]
    rates = interleaved_rates(cfg, bare, ["fp32", "channels_last", "bf16"], args.variant_steps)
    fp32 = rates["fp32"]
    flops = flops_per_image(build_contrastive_model(cfg.model, in_channels=c), (c, size, size))
    peak = measure_peak_flops()
    emit(
        "pretrain_step_mfu",
        3.0 * flops * fp32 / 1e9,
        "GFLOP/s",
        peak / 1e9,
        views_per_s=round(fp32, 1),
        fwd_flops_per_image=flops,
        note="3 x forward FLOPs x views/s of the bare fp32 NCHW eager step / measured fp32 "
        "torch.mm peak (2048x2048)",
        setup=setup,
    )
    for name in ("channels_last", "bf16"):
        emit(f"pretrain_step_{name}", rates[name], "views/s", fp32, steps=args.variant_steps,
             note=f"bare step with {name} vs fp32 NCHW eager, interleaved", setup=setup)  # fmt: skip
    # torch.compile in a child process under a time limit.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-child",
           "--dataset", args.dataset, "--max-train", str(args.max_train),
           "--batch", str(args.batch), "--threads", str(args.threads),
           "--variant-steps", str(args.variant_steps)]  # fmt: skip
    for o in args.overrides:
        cmd += ["--set", o]
    note, value, base = None, None, fp32
    try:
        t, proc = timed(
            lambda: subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.compile_timeout, cwd=REPO
            )
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            got = json.loads(lines[-1])
            value, base = got["compile"], got["fp32"]
            note = f"compiled and measured in a child process in {t:.0f} s"
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            note = f"failed: {tail[:200]}"
    except subprocess.TimeoutExpired:
        note = f"failed: no result within --compile-timeout {args.compile_timeout:.0f} s"
    emit("pretrain_step_compile", value, "views/s", base, steps=args.variant_steps, note=note,
         setup=setup)  # fmt: skip


def compile_child(args) -> None:
    """Child of ``run_variants_part``: fp32 eager vs torch.compile, interleaved; one JSON dict."""
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args, tmp)
        ds = shard_stage.run(ShardSlice.of(cfg), str(Path(tmp) / "ds")).outputs["dataset"]
        images, _, _ = load_split(ds, "train")
        size = int(cfg.augment.image_size or dataset_info(ds)["height"])
        bare = Bare(cfg, images, size)
        rates = interleaved_rates(cfg, bare, ["fp32", "compile"], args.variant_steps)
    print(json.dumps(rates), flush=True)


# -- sharding with 1 and 2 Ray workers ----------------------------------------------------------


def _shard_only_rate(metrics: dict[str, float]) -> float:
    return metrics["num_images"] / max(metrics["seconds"] - metrics["load_seconds"], 1e-9)


def run_sharding_part(args, tmp) -> None:
    import ray

    from workflows.sharding import ray_map

    sets = [f"data.shard_size={args.shard_size}", "data.max_test=10000"]
    if args.shard_max_train:
        sets.append(f"data.max_train={args.shard_max_train}")
    cfg = load_config("demo", [f"data.source={args.dataset}", *sets, f"storage.root={tmp}"])

    @ray.remote(num_cpus=1)
    def _warm() -> int:
        import pipeline.data.shards  # noqa: F401

        return os.getpid()

    ray.get([_warm.remote() for _ in range(args.threads)])
    runs = {
        "map": lambda out: shard_stage.run(ShardSlice.of(cfg), out),
        1: lambda out: shard_stage.run(
            ShardSlice.of(cfg), out, map_fn=ray_map(num_cpus=float(args.threads))
        ),
        2: lambda out: shard_stage.run(
            ShardSlice.of(cfg), out, map_fn=ray_map(num_cpus=args.threads / 2)
        ),
    }
    got: dict[Any, dict[str, float]] = {}
    for r in range(args.shard_repeats):  # the order alternates; the best run of each counts
        for key in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            res = runs[key](str(Path(tmp) / f"shard_{key}_{r}"))
            if key not in got or _shard_only_rate(res.metrics) > _shard_only_rate(got[key]):
                got[key] = res.metrics
    common = {
        "images": int(got[1]["num_images"]),
        "shards": int(got[1]["num_shards"]),
        "repeats": args.shard_repeats,
        "note": "shard writing only (PNG encode, tar, hashes, manifest); source load excluded",
    }
    emit("shard_ray_1_worker", _shard_only_rate(got[1]), "images/s", _shard_only_rate(got["map"]),
         digits=1, baseline_is="builtin map in this process", **common,
         stage_images_per_s=round(got[1]["images_per_s"], 1))  # fmt: skip
    emit("shard_ray_2_workers", _shard_only_rate(got[2]), "images/s", _shard_only_rate(got[1]),
         digits=1, baseline_is="1 Ray worker", **common,
         stage_images_per_s=round(got[2]["images_per_s"], 1))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.compile_child:
        compile_child(args)
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args, tmp)
        ds = shard_stage.run(ShardSlice.of(cfg), str(Path(tmp) / "dataset")).outputs["dataset"]
        images, _, _ = load_split(ds, "train")
        size = int(cfg.augment.image_size or dataset_info(ds)["height"])
        setup = setup_of(cfg, size, images.shape[1]) | {"train_images": len(images)}
        bare = Bare(cfg, images, size)
        needs_ray = {"pipeline", "sharding"} & set(args.parts)
        if needs_ray:
            import ray

            ray.init(num_cpus=args.threads, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)  # fmt: skip
        try:
            if "pipeline" in args.parts:
                run_pipeline_part(args, cfg, ds, tmp, bare, setup)
            if "data" in args.parts:
                run_data_part(args, cfg, ds, size, bare, setup)
            if "variants" in args.parts:
                run_variants_part(args, cfg, images, size, bare, setup)
            if "sharding" in args.parts:
                run_sharding_part(args, tmp)
        finally:
            if needs_ray:
                ray.shutdown()


if __name__ == "__main__":
    main()
