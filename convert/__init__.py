"""Checkpoint converters: `python -m convert FAMILY --checkpoint PATH --out DIR`.

Each family module exposes `convert(state_dict, **cfg) -> (name, overrides, variables)`,
pure and torch-free, plus `detect_format`/`read` hooks used by `convert.__main__`.
"""
