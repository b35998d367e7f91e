"""What fine-tuning, the baseline and distillation share around their training loop: the stage's
setup (seed, dataset, view size, in memory or streamed), the validation hook, and the tail that
writes the classifier's model file, its history and the stage's metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.config import ModelConfig
from pipeline.data import DatasetInfo, dataset_info
from pipeline.distributed import convert_sync_batchnorm
from pipeline.models import Classifier, save_model
from pipeline.runtime import LocalContext, StageResult, TrainContext
from pipeline.slices import DistillSlice, SupervisedSlice
from pipeline.stages.common import (
    StreamSplit,
    accuracy,
    encode,
    load_data,
    seed_everything,
    use_memory,
    view_size,
    write_json,
)
from pipeline.stages.supervised import Evaluate, History

__all__ = ["ClassifierStage"]


@dataclass
class ClassifierStage:
    """One supervised stage's setting: where its data and outputs are, how it reads the data."""

    cfg: SupervisedSlice | DistillSlice
    dataset: str
    out: Path
    ctx: TrainContext
    info: DatasetInfo
    size: int
    streaming: bool

    @classmethod
    def open(
        cls,
        cfg: SupervisedSlice | DistillSlice,
        inputs: dict[str, str],
        out_dir: str,
        ctx: TrainContext | None,
    ) -> ClassifierStage:
        """Seed this rank and read ``inputs['dataset']``'s description."""
        out = Path(out_dir)
        ctx = ctx or LocalContext(out / "checkpoints")
        seed_everything(cfg.seed * 100 + ctx.rank)
        ds = inputs["dataset"]
        info = dataset_info(ds)
        size, streaming = view_size(cfg.image_size, info), not use_memory(cfg.data, info)
        return cls(cfg, ds, out, ctx, info, size, streaming)

    @property
    def channels(self) -> int:
        return int(self.info["channels"])

    @property
    def n_classes(self) -> int:
        return len(self.info["classes"])

    def train_stream(self) -> StreamSplit:
        """The train split as this rank's stream."""
        c = self.cfg
        return StreamSplit(
            c.data, c.seed, self.dataset, "train", self.ctx.rank, self.ctx.world_size
        )

    def prepare(self, model: Classifier) -> Classifier:
        """``model`` with synchronised BatchNorm when the stage runs on several ranks."""
        if self.ctx.world_size > 1:
            return convert_sync_batchnorm(model)  # type: ignore[return-value]
        return model

    def val_top1(self) -> Evaluate:
        """The validation hook: top-1 (%) on the val split (none when the split is empty)."""
        size = self.size
        if self.streaming:
            stream = StreamSplit(self.cfg.data, self.cfg.seed, self.dataset, "val")

            def streamed(m: nn.Module) -> dict[str, float]:
                logits, labels, _ = stream.features(m, size)
                return {"val_top1": accuracy(logits, labels)} if len(labels) else {}

            return streamed
        val = load_data(self.dataset, "val")

        def in_memory(m: nn.Module) -> dict[str, float]:
            logits = encode(m, val.images, size=size)
            return {"val_top1": accuracy(logits, val.labels)} if len(val) else {}

        return in_memory

    def finish(
        self,
        history: History,
        model: Classifier,
        model_section: ModelConfig,
        head_layers: int,
        extra: dict[str, float],
    ) -> StageResult:
        """Write ``model.pt`` (kind 'classifier') and ``history.json`` (rank 0); the metrics are
        the last epoch's val top-1 and loss, ``extra`` and whether the data was streamed."""
        outputs = {"model": str(self.out / "model.pt"), "history": str(self.out / "history.json")}
        final = history[-1]
        metrics: dict[str, float] = {}
        if "val_top1" in final:
            metrics["val_top1"] = final["val_top1"]
        metrics.update(extra)
        metrics.update(train_loss=final["loss"], data_streaming=float(self.streaming))
        if self.ctx.rank == 0:
            save_model(
                outputs["model"],
                kind="classifier",
                model_section=model_section.model_dump(),
                in_channels=self.channels,
                num_classes=self.n_classes,
                state_dict=model.state_dict(),
                head_layers=head_layers,
            )
            write_json(outputs["history"], history)
        return StageResult(outputs=outputs, metrics=metrics, history=history)
