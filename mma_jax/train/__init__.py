"""Training: loss, optimizer, the jitted step, orbax checkpoints, metrics, the loop."""
