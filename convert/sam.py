"""SAM image encoders: the released `sam_vit_{b,l,h}_*.pth` and Hugging Face `SamModel` folders.

  original  segment_anything state dict; the encoder is `image_encoder.*` (a bare encoder state
            dict without the prefix is accepted too); `prompt_encoder.*` and `mask_decoder.*`
            are ignored.
  hf        transformers `SamModel` / `SamVisionModel`: `vision_encoder.*`; `prompt_encoder.*`,
            `mask_decoder.*` and `shared_image_embedding.*` are ignored.
The model size is read from the checkpoint (width -> sam_vit{b,l,h}); a checkpoint saved at
another resolution (e.g. fine-tuned at 224) keeps its own position-embedding grid.
"""
import numpy as np

from convert import core

FORMATS = ("original", "hf")
WIDTHS = {768: "sam_vitb", 1024: "sam_vitl", 1280: "sam_vith"}

# Source key names (relative to the encoder prefix) of each target, per format.
_NAMES = {
    "original": dict(prefix="image_encoder.", patch="patch_embed.proj", pos="pos_embed", block="blocks.{}",
                     norm1="norm1", norm2="norm2", fc1="mlp.lin1", fc2="mlp.lin2", neck_conv1="neck.0",
                     neck_norm1="neck.1", neck_conv2="neck.2", neck_norm2="neck.3",
                     ignore=(r"prompt_encoder\..*", r"mask_decoder\..*")),
    "hf": dict(prefix="vision_encoder.", patch="patch_embed.projection", pos="pos_embed", block="layers.{}",
               norm1="layer_norm1", norm2="layer_norm2", fc1="mlp.lin1", fc2="mlp.lin2", neck_conv1="neck.conv1",
               neck_norm1="neck.layer_norm1", neck_conv2="neck.conv2", neck_norm2="neck.layer_norm2",
               ignore=(r"prompt_encoder\..*", r"mask_decoder\..*", r"shared_image_embedding\..*")),
}


def add_arguments(parser):
  parser.add_argument("--rel-pos-resize", default="nearest", choices=["nearest", "linear"],
                      help="how the global blocks' relative-position tables follow a non-native input size: "
                           "'nearest' as the paper's code (default), 'linear' as segment_anything's get_rel_pos")
  parser.add_argument("--no-neck", action="store_true",
                      help="the checkpoint holds no neck (the paper's filter_interpolate_weights drops it): "
                           "convert the encoder and set the neck's parameters to zero (pooled, tokens and blocks "
                           "do not use it)")


def encoder_prefix(state_dict: dict, fmt: str) -> str:
  prefix = _NAMES[fmt]["prefix"]
  if any(k.startswith(prefix) for k in state_dict):
    return prefix
  if fmt == "original" and "patch_embed.proj.weight" in state_dict:
    return ""  # a bare ImageEncoderViT state dict
  raise core.ConversionError(
      f"no SAM image encoder found: expected keys starting with {prefix!r} "
      f"(e.g. {prefix}patch_embed...), got {sorted(state_dict)[:5]}{' ...' if len(state_dict) > 5 else ''}")


def convert(state_dict: dict[str, np.ndarray], fmt: str = "original", model: str = "sam_vitb",
            source: str = "checkpoint", no_neck: bool = False, **overrides) -> dict:
  """Flax variables of `models.create(model, **overrides)` from a SAM state dict in format `fmt`;
  with `no_neck`, a state dict without the neck, whose parameters are then zero."""
  from mfjax import models
  names = _NAMES[fmt]
  module = models.create(model, **overrides)
  c = core.Conversion(state_dict, models.abstract_variables(module), source)
  p = encoder_prefix(state_dict, fmt)
  dense = lambda target, key: (c.map(f"params/{target}/kernel", f"{p}{key}.weight", core.linear),
                               c.map(f"params/{target}/bias", f"{p}{key}.bias"))
  norm = lambda target, key: (c.map(f"params/{target}/scale", f"{p}{key}.weight"),
                              c.map(f"params/{target}/bias", f"{p}{key}.bias"))
  c.map("params/patch_embed/kernel", f"{p}{names['patch']}.weight", core.conv)
  c.map("params/patch_embed/bias", f"{p}{names['patch']}.bias")
  c.map("params/pos_embed", f"{p}{names['pos']}")
  depth = module.depth if module.num_blocks is None else module.num_blocks
  for i in range(depth):
    src, dst = names["block"].format(i), f"blocks_{i}"
    norm(f"{dst}/norm1", f"{src}.{names['norm1']}")
    dense(f"{dst}/attn/qkv", f"{src}.attn.qkv")
    dense(f"{dst}/attn/proj", f"{src}.attn.proj")
    c.map(f"params/{dst}/attn/rel_pos_h", f"{p}{src}.attn.rel_pos_h")
    c.map(f"params/{dst}/attn/rel_pos_w", f"{p}{src}.attn.rel_pos_w")
    norm(f"{dst}/norm2", f"{src}.{names['norm2']}")
    dense(f"{dst}/mlp/fc1", f"{src}.{names['fc1']}")
    dense(f"{dst}/mlp/fc2", f"{src}.{names['fc2']}")
  neck_keys = [k for k in state_dict if k.startswith(f"{p}neck.")]
  if no_neck:
    if neck_keys:
      raise core.ConversionError(f"{source}: --no-neck, but the checkpoint holds a neck ({neck_keys[0]}, ...)")
    for target, shape in c.expected.items():
      if target.startswith("params/neck/"):
        c.put(target, np.zeros(shape, np.float32), "(--no-neck)")
  else:
    if not neck_keys:
      raise core.ConversionError(f"{source}: no neck ({p}neck.*) in the checkpoint, as the paper's "
                                 "filter_interpolate_weights writes it: pass --no-neck to convert the encoder alone")
    c.map("params/neck/conv1/kernel", f"{p}{names['neck_conv1']}.weight", core.conv)
    norm("neck/norm1", names["neck_norm1"])
    c.map("params/neck/conv2/kernel", f"{p}{names['neck_conv2']}.weight", core.conv)
    norm("neck/norm2", names["neck_norm2"])
  for pattern in names["ignore"]:
    c.ignore(pattern)
  return c.finish()


def _hf_vision_config(hf_config: dict) -> dict:
  if hf_config.get("model_type") == "sam_vision_model":
    return hf_config
  if "vision_config" in hf_config:
    return hf_config["vision_config"]
  raise core.ConversionError(f"config.json is neither a SamModel (with vision_config) nor a SamVisionModel "
                             f"config (model_type {hf_config.get('model_type')!r})")


def _hf_overrides(vision: dict, model: str) -> dict:
  """Constructor overrides of `model` that an HF SamVisionConfig asks for; unsupported settings raise."""
  from mfjax.models import sam
  unsupported = {k: vision[k] for k, ok in (("use_abs_pos", True), ("use_rel_pos", True), ("qkv_bias", True),
                                            ("hidden_act", "gelu"), ("num_channels", 3))
                 if k in vision and vision[k] != ok}
  if unsupported:
    raise core.ConversionError(f"unsupported SAM vision settings in config.json: {unsupported}")
  image_size = vision.get("image_size", 1024)
  image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
  width = vision.get("hidden_size", 768)
  wanted = dict(width=width, depth=vision.get("num_hidden_layers", 12), heads=vision.get("num_attention_heads", 12),
                mlp_hidden=vision.get("mlp_dim") or int(width * vision.get("mlp_ratio", 4.0)),
                window=vision.get("window_size", 14),
                global_blocks=tuple(vision.get("global_attn_indexes", (2, 5, 8, 11))),
                neck_features=vision.get("output_channels", 256), ln_eps=vision.get("layer_norm_eps", 1e-6),
                patch_size=vision.get("patch_size", 16), native_resolution=image_size)
  registered = {**{f: getattr(sam.Model, f) for f in wanted}, **sam.MODELS[model]}
  return {k: v for k, v in wanted.items() if registered[k] != v}


def _original_overrides(state: dict, prefix: str, model: str) -> dict:
  """The one setting a segment_anything state dict can change: its position-embedding grid."""
  from mfjax.models import sam
  registered = {**{f: getattr(sam.Model, f) for f in ("native_resolution", "patch_size")}, **sam.MODELS[model]}
  pos = state.get(prefix + "pos_embed")
  if pos is None or pos.ndim != 4:
    return {}  # the strict conversion reports it
  native = (pos.shape[1] * registered["patch_size"], pos.shape[2] * registered["patch_size"])
  return {"native_resolution": native} if native != tuple(registered["native_resolution"]) else {}


def encoder_width(state: dict, prefix: str, fmt: str) -> int:
  """The encoder width, from the patch embedding (or the position embedding)."""
  patch = f"{prefix}{_NAMES[fmt]['patch']}.weight"
  if patch in state and state[patch].ndim == 4:
    return int(state[patch].shape[0])
  pos = state.get(prefix + "pos_embed")
  if pos is not None and pos.ndim == 4:
    return int(pos.shape[-1])
  raise core.ConversionError(f"cannot tell the SAM encoder's width: neither {patch} (width, 3, 16, 16) nor "
                             f"{prefix}pos_embed (1, rows, cols, width) is in the checkpoint")


def from_checkpoint(raw, hf_config, fmt, args):
  # A fine-tune's file may wrap the state dict ({"model": ...}, {"state_dict": ...}).
  state = core.flatten_state_dict(core.unwrap(raw, ("model", "state_dict"))) if fmt == "original" else raw
  prefix = encoder_prefix(state, fmt)
  width = encoder_width(state, prefix, fmt)
  if width not in WIDTHS:
    raise core.ConversionError(f"SAM encoder of width {width}: no registered model "
                               f"(known widths {sorted(WIDTHS)} -> {sorted(WIDTHS.values())})")
  model = WIDTHS[width]
  if fmt == "hf":
    overrides = _hf_overrides(_hf_vision_config(hf_config), model)
  else:
    overrides = _original_overrides(state, prefix, model)
  if args.rel_pos_resize != "nearest":
    overrides["rel_pos_resize"] = args.rel_pos_resize
  variables = convert(state, fmt, model, source=f"{args.checkpoint} ({fmt} SAM checkpoint)",
                      no_neck=getattr(args, "no_neck", False), **overrides)
  return model, overrides, variables
