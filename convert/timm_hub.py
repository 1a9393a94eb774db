"""The model named by a timm Hugging Face folder (config.json + model.safetensors)."""
from convert import core

# model_args that change only the classifier or training-time regularisation, not the backbone.
BACKBONE_NEUTRAL_ARGS = {"num_classes", "global_pool", "drop_rate", "drop_path_rate",
                         "proj_drop_rate"}


def architecture(hf_config: dict, valid: tuple[str, ...], family: str) -> str:
  """The registered model named by a timm config.json's `architecture`, or ConversionError."""
  arch = hf_config.get("architecture")
  if arch is None:
    raise core.ConversionError(
        f"config.json has no 'architecture' field, so the folder is not a timm model; the {family} "
        "converter reads timm model folders and checkpoint files")
  if arch not in valid:
    raise core.ConversionError(f"config.json architecture {arch!r} is not a model the {family} "
                               f"converter knows; valid: {', '.join(valid)}")
  changed = sorted(set(hf_config.get("model_args") or {}) - BACKBONE_NEUTRAL_ARGS)
  if changed:
    raise core.ConversionError(f"config.json builds {arch!r} with non-default model_args {changed}; "
                               f"only the registered {arch} architecture can be converted")
  return arch
