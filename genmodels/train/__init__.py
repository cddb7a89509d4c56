"""Training: the Ray Train worker loop (loop.py), its driver (run.py), checkpoints, DDP helpers."""
