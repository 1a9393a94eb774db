"""Launchers: Cloud TPU VMs and pod slices (tpu.py), one GPU machine or a SLURM cluster (gpu.py)."""
