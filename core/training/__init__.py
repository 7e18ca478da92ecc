"""Training: the Lightning module, stages, the Trainer, optimisers, checkpoints and exact resume,
loggers, distributed strategies."""
