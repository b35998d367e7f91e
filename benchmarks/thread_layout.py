"""Two single-thread training processes vs one two-thread process, on this machine's cores.

The demo's fine-tuning, baseline and distillation stages train small networks on small batches;
this measures whether they use a second intra-op thread or are better run two at a time with one
thread each (``resources.stages`` in ``workflows/configs/demo.yaml``). One line per network:
``value`` = images/s of two concurrent 1-thread processes (summed), ``baseline`` = one process
with 2 threads, same network, batch and step (forward, cross-entropy, backward, AdamW).

    python benchmarks/thread_layout.py [--steps 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch
from _common import emit  # (puts the repo on sys.path)

from pipeline.config import load_config
from pipeline.models import Classifier, backbone_from, build_contrastive_model

CASES = (  # (name, width, batch): the demo's student, and its fine-tuning network
    ("distill_student_x0.06_b256", 0.06, 256),
    ("finetune_x0.125_b64", 0.125, 64),
)


def _rate(width: float, batch: int, threads: int, steps: int, start=None, out=None) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    section = load_config("demo").model.model_copy(update={"width": width})
    backbone, dim = backbone_from(build_contrastive_model(section, in_channels=1), 0)
    model = Classifier(backbone, dim, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if start is not None:
        start.wait()  # both processes time the same wall-clock window
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * batch / (time.perf_counter() - t0)
    if out is not None:
        out.put(rate)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    for name, width, batch in CASES:
        one = _rate(width, batch, threads=2, steps=args.steps)
        start, out = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_rate, args=(width, batch, 1, args.steps, start, out))
            for _ in range(2)
        ]
        for p in procs:
            p.start()
        rates = [out.get() for _ in procs]
        for p in procs:
            p.join()
        emit(
            f"thread_layout_{name}",
            sum(rates),
            "images/s (2 processes x 1 thread)",
            one,
            per_process=[round(r, 1) for r in rates],
            baseline_is="1 process x 2 threads",
        )


if __name__ == "__main__":
    main()
