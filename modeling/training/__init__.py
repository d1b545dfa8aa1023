"""Training: the loop, checkpoints, metrics, several processes, and the cross-validation driver."""
