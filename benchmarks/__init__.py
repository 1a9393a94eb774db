"""Benchmarks: mfjax next to its PyTorch reference, measured in the same run (see BENCHMARKS.md)."""
