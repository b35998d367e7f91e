"""Pipeline stages: ``shard``, ``pretrain``, ``finetune``, ``distill``, ``evaluate``.

Each stage module exposes ``run(...) -> pipeline.runtime.StageResult``, writes only inside its
``out_dir`` and imports neither Ray nor MLflow (``workflows/`` supplies those).
"""
