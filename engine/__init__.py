"""Training loop, evaluation, metrics, checkpoints, distributed helpers, reports."""
