"""Training: DeepSpeed engine glue, task module, checkpoints, trainer loop."""
