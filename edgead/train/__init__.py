"""Training loop, EMA, checkpoints (safetensors + JSON) and DistributedDataParallel under torchrun."""
