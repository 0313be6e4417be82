"""One training run and its folder: the trainer, checkpoints, distribution, tracking, pipelines, reports."""
