"""Data: image sources, WebDataset shards, loaders and SimCLR augmentations.

No Ray, no MLflow here: ``workflows.sharding`` runs the shard writes as Ray tasks.
"""

from pipeline.data.folder import DatasetInfo, dataset_info, shard_paths
from pipeline.data.loader import ShardDataset, iter_samples, make_loader
from pipeline.data.memory import load_split, load_subset
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
