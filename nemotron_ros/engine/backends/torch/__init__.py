"""PyTorch runtime (safetensors checkpoints, BF16 or ModelOpt FP8) with xgrammar constraints."""
