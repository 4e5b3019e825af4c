"""Training: building a run from its config, the loop, checkpoints, processes, TensorBoard."""
