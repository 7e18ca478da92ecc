"""Training: the Lightning module, stages, checkpoints, evaluation."""
