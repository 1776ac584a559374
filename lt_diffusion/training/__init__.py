"""Training: the Lightning module, EMA, checkpoints and callbacks."""
