"""FocalNet checkpoints: SEEM's `seem_focalt_v0.pt` / `seem_focalt_v1.pt`, and timm `focalnet_*`.

A SEEM file holds the whole SEEM model as a flat state dict (or one under 'model'). Its vision
backbone is under `backbone.` in the original focal_dw naming (or alone, without the prefix, as
the paper's `*_processed.pt` files hold it); every other key (pixel decoder,
transformer decoder, language encoder, ...) is ignored explicitly. A timm file or Hugging Face
folder holds timm's FocalNet (`stem.*`, `layers.*`, `norm.*`); its classifier `head.*` is ignored.
"""
import re

import numpy as np

from convert import core, timm_hub

FORMATS = ("original", "hf")
SEEM_MODEL = "seem_focalt"
SEEM_PREFIX = "backbone."


def _model_names() -> tuple[str, ...]:
  from mfjax.models import focalnet
  return tuple(focalnet.MODELS)


def add_arguments(parser) -> None:
  parser.add_argument(
      "--model", choices=sorted(_model_names()), default=None,
      help=f"model to convert into; default: {SEEM_MODEL} for SEEM files, detected from the "
           "tensor shapes (or config.json) for timm FocalNet checkpoints")


# ----------------------------------------------------------------------- layouts


def pointwise(w: np.ndarray) -> np.ndarray:
  """torch 1x1 Conv2d weight (out, in, 1, 1) -> flax Dense kernel (in, out)."""
  if w.ndim != 4 or w.shape[2:] != (1, 1):
    raise ValueError(f"expected a 1x1 conv weight (out, in, 1, 1), got {tuple(w.shape)}")
  return np.ascontiguousarray(w[:, :, 0, 0].T)


def _norm(c: core.Conversion, dst: str, src: str) -> None:
  c.map(f"{dst}/scale", f"{src}.weight")
  c.map(f"{dst}/bias", f"{src}.bias")


def _conv(c: core.Conversion, dst: str, src: str, bias: bool = True) -> None:
  c.map(f"{dst}/kernel", f"{src}.weight", core.conv)
  if bias:
    c.map(f"{dst}/bias", f"{src}.bias")


def _dense(c: core.Conversion, dst: str, src: str, layout) -> None:
  c.map(f"{dst}/kernel", f"{src}.weight", layout)
  c.map(f"{dst}/bias", f"{src}.bias")


def _embed(c: core.Conversion, dst: str, src: str) -> None:
  _conv(c, f"{dst}/proj", f"{src}.proj")
  _norm(c, f"{dst}/norm", f"{src}.norm")


def _blocks(c: core.Conversion, m, src_block, ls_name, norm_name, linear, modulation_norm):
  """Per-block parameters, shared by both layouts; the arguments say how each is named/stored."""
  for s, depth in enumerate(m.depths):
    for i in range(depth):
      src, dst = src_block(s, i), f"params/layers_{s}_blocks_{i}"
      for index in ("1", "2"):
        if m.layerscale:
          c.map(f"{dst}/ls{index}/gamma", src + ls_name(index))
        if m.dw_residual:
          _conv(c, f"{dst}/dw{index}", f"{src}dw{index}")
        _norm(c, f"{dst}/norm{index}", src + norm_name(index))
      mod = f"{src}modulation."
      _dense(c, f"{dst}/modulation/f", mod + "f", linear)
      _dense(c, f"{dst}/modulation/h", mod + "h", pointwise)
      _dense(c, f"{dst}/modulation/proj", mod + "proj", linear)
      for level in range(m.focal_levels[s]):
        _conv(c, f"{dst}/modulation/focal_layers_{level}", f"{mod}focal_layers.{level}.0",
              bias=False)
      if m.post_norm_in_modulation:
        _norm(c, f"{dst}/modulation/norm", mod + modulation_norm)
      _dense(c, f"{dst}/mlp/fc1", f"{src}mlp.fc1", linear)
      _dense(c, f"{dst}/mlp/fc2", f"{src}mlp.fc2", linear)


def map_seem(c: core.Conversion, m) -> None:
  """SEEM's focal_dw names under `backbone.`; downsampling at the end of stages 0..2."""
  p = SEEM_PREFIX
  c.ignore(rf"(?!{re.escape(p)}).*")  # the rest of SEEM: decoders, language encoder, ...
  _embed(c, "params/patch_embed", f"{p}patch_embed")
  _blocks(c, m, lambda s, i: f"{p}layers.{s}.blocks.{i}.", lambda k: f"gamma_{k}",
          lambda k: f"norm{k}", core.linear, "ln")
  last = len(m.depths) - 1
  for s in range(len(m.depths)):
    if s < last:
      _embed(c, f"params/layers_{s}_downsample", f"{p}layers.{s}.downsample")
    if m.stage_norms or s == last:
      _norm(c, f"params/norm{s}", f"{p}norm{s}")


def map_timm(c: core.Conversion, m) -> None:
  """timm's FocalNet names: 1x1 convs for f/h/proj/mlp, downsampling at the start of stages 1..3."""
  if m.dw_residual or m.stage_norms:
    raise core.ConversionError(f"{c.source}: a timm FocalNet state dict has no depthwise residual "
                               "convs or per-stage norms, which this model needs; convert a SEEM "
                               "checkpoint into it instead")
  c.ignore(r"head\..*")  # the ImageNet classifier
  post = "_post" if m.norm_placement == "post" else ""
  _embed(c, "params/patch_embed", "stem")
  _blocks(c, m, lambda s, i: f"layers.{s}.blocks.{i}.", lambda k: f"ls{k}.gamma",
          lambda k: f"norm{k}{post}", pointwise, "norm")
  last = len(m.depths) - 1
  for s in range(last):
    _embed(c, f"params/layers_{s}_downsample", f"layers.{s + 1}.downsample")
  _norm(c, f"params/norm{last}", "norm")


LAYOUTS = {"seem": map_seem, "timm": map_timm}


def convert(state_dict: dict[str, np.ndarray], model: str = SEEM_MODEL, layout: str = "seem",
            source: str = "checkpoint", overrides: dict | None = None) -> dict:
  """Flax variables of FocalNet `model` (with constructor `overrides`) from a SEEM
  (`layout="seem"`) or timm (`layout="timm"`) state dict."""
  from mfjax import models
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; valid: {sorted(LAYOUTS)}")
  if models.family_of(model) != "focalnet":
    raise ValueError(f"{model!r} is not a FocalNet model; valid: {', '.join(_model_names())}")
  module = models.create(model, **(overrides or {}))
  c = core.Conversion(state_dict, models.abstract_variables(module), source=source)
  LAYOUTS[layout](c, module)
  return c.finish()


# --------------------------------------------------------------------- detection


def detect_layout(state: dict, source: str) -> str:
  if any(k.startswith(SEEM_PREFIX) for k in state):
    return "seem"
  if "stem.proj.weight" in state:
    return "timm"
  shown = ", ".join(sorted(state)[:8]) or "no tensors at all"
  raise core.ConversionError(
      f"{source}: neither a SEEM checkpoint (keys under '{SEEM_PREFIX}') nor a timm FocalNet "
      f"(keys 'stem.proj.weight', 'layers.*'); its keys begin: {shown}")


def timm_architecture(state: dict) -> dict:
  """The FocalNet fields a timm state dict's key names and tensor shapes determine."""
  blocks: dict[int, int] = {}  # stage -> number of blocks
  levels: dict[int, int] = {}  # stage -> number of focal levels (in block 0)
  for key in state:
    if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
      stage, block = int(m[1]), int(m[2])
      blocks[stage] = max(blocks.get(stage, 0), block + 1)
      if block == 0 and re.search(r"\.modulation\.focal_layers\.\d+\.0\.weight$", key):
        levels[stage] = levels.get(stage, 0) + 1
  stages = sorted(blocks)
  window = lambda s: state.get(f"layers.{s}.blocks.0.modulation.focal_layers.0.0.weight")
  block0 = "layers.0.blocks.0."
  return dict(
      embed_dim=int(state["stem.proj.weight"].shape[0]),
      stem_kernel=int(state["stem.proj.weight"].shape[-1]),
      depths=tuple(blocks[s] for s in stages),
      focal_levels=tuple(levels.get(s, 0) for s in stages),
      focal_windows=tuple(int(window(s).shape[-1]) if window(s) is not None else 0 for s in stages),
      norm_placement="post" if f"{block0}norm1_post.weight" in state else "pre",
      layerscale=f"{block0}ls1.gamma" in state,
      post_norm_in_modulation=f"{block0}modulation.norm.weight" in state)


def detect_timm_model(state: dict, source: str) -> str:
  from mfjax import models
  found = timm_architecture(state)
  matches = []
  for name in _model_names():
    m = models.create(name)
    fields = dict(embed_dim=m.embed_dim, stem_kernel=m.stem_conv[0], depths=tuple(m.depths),
                  focal_levels=tuple(m.focal_levels), focal_windows=tuple(m.focal_windows),
                  norm_placement=m.norm_placement, layerscale=m.layerscale,
                  post_norm_in_modulation=m.post_norm_in_modulation)
    if fields == found:
      matches.append(name)
  if len(matches) != 1:
    raise core.ConversionError(
        f"{source}: this timm FocalNet ({found}) matches "
        f"{'no registered model' if not matches else 'several models: ' + ', '.join(matches)}; "
        f"pass --model (valid: {', '.join(_model_names())})")
  return matches[0]


def from_checkpoint(raw, hf_config, fmt, args):
  source = getattr(args, "checkpoint", "checkpoint")
  if fmt == "hf":
    name = timm_hub.architecture(hf_config, _model_names(), "seem")
    if args.model and args.model != name:
      raise core.ConversionError(
          f"{source}: config.json says {name!r}, but --model {args.model} was given")
    state, layout = raw, "timm"
  else:
    if not isinstance(raw, dict):
      raise core.ConversionError(f"{source}: holds a {type(raw).__name__}, not a state dict")
    state = core.flatten_state_dict(core.unwrap(raw, ("model", "state_dict")))
    if not any(k.startswith(SEEM_PREFIX) for k in state) and "layers.0.blocks.0.dw1.weight" in state:
      state = {SEEM_PREFIX + k: v for k, v in state.items()}  # SEEM's backbone alone (focal_dw names)
    layout = detect_layout(state, source)
    name = args.model or (SEEM_MODEL if layout == "seem" else detect_timm_model(state, source))
  return name, {}, convert(state, model=name, layout=layout, source=source)
