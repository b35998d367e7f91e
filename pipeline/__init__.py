"""Contrastive representation learning: data, models, losses, optimisers and stages.

Plain PyTorch, torchvision, webdataset and pyarrow; nothing here imports Ray or MLflow, so every
piece runs and is tested in one process.
"""

__version__ = "0.1.0"
