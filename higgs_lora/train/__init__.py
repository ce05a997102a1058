"""Training: the data the loop reads, optimiser, loss, the loop around the DeepSpeed engine, checkpoints, metrics."""
