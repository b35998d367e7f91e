"""Data: image sources, WebDataset shards, loaders and SimCLR augmentations.

No Ray, no MLflow here: ``workflows.sharding`` runs the shard writes as Ray tasks.
"""

from pipeline.data.loader import (
    DatasetInfo,
    ShardDataset,
    dataset_info,
    iter_samples,
    load_split,
    load_subset,
    make_loader,
    shard_paths,
)
from pipeline.data.shards import (
    build_dataset,
    dataset_digest,
    format_fraction,
    label_subset,
    write_shard,
)
from pipeline.data.sources import DataError, Record, Skip, SourceData, load_source, prepare_splits

__all__ = [
    "DataError",
    "DatasetInfo",
    "Record",
    "ShardDataset",
    "Skip",
    "SourceData",
    "build_dataset",
    "dataset_digest",
    "dataset_info",
    "format_fraction",
    "iter_samples",
    "label_subset",
    "load_source",
    "load_split",
    "load_subset",
    "make_loader",
    "prepare_splits",
    "shard_paths",
    "write_shard",
]
