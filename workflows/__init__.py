"""Running the pipeline: the stage graph, durable run records, the Ray runner, MLflow tracking,
Ray Train / Tune / Jobs integration and the ``contrastive`` CLI.

``pipeline/`` holds the ML in plain PyTorch; everything that knows about Ray or MLflow lives here.
"""
