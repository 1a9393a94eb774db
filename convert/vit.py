"""Key maps from the ViT-like checkpoint layouts into `mfjax.models.vit.Model`.

Layouts: timm/original (DeiT, DINOv1, DINOv2 torch hub, BLIP's visual_encoder), Hugging Face
ViT / Dinov2 / Dinov2WithRegisters / CLIPVision / BlipVision, and OpenCLIP's `visual.*`.
Each `map_*` fills a `core.Conversion`; `arch_*` reads the architecture from tensor shapes
(and the HF config), so checkpoints of other widths and depths convert too.
"""
import re

import numpy as np

from convert import core
from mfjax import models


def count_blocks(state: dict, prefix: str) -> int:
  """1 + the highest block index under `prefix` (e.g. 'blocks.'), so one damaged block still counts."""
  rx = re.compile(re.escape(prefix) + r"(\d+)\.")
  indices = [int(m.group(1)) for k in state if (m := rx.match(k))]
  return max(indices) + 1 if indices else 0


def strip_prefix(state: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def grid_from_tokens(n_patches: int, what: str) -> int:
  side = int(round(n_patches ** 0.5))
  if side * side != n_patches:
    raise core.ConversionError(f"{what}: {n_patches} position embeddings is not a square grid")
  return side


def require(state: dict, keys: list[str], source: str) -> None:
  """Keys needed to read the architecture at all; fail early with all of them listed."""
  absent = [k for k in keys if k not in state]
  if absent:
    raise core.ConversionError(f"cannot convert {source}: missing keys needed to read the "
                               f"architecture: {absent}")


def new_conversion(state, name, overrides, source):
  module = models.create(name, **overrides)
  return core.Conversion(state, models.abstract_variables(module), source)


def _qkv_concat(conv: core.Conversion, keys: list[str]):
  parts = [conv.take(k) for k in keys]
  if any(p is None for p in parts):
    return None
  return np.concatenate(parts, axis=0)


def map_fused_qkv_block(conv, target, src, names):
  """One transformer block whose source uses a fused qkv Linear."""
  ln1, qkv, proj, ln2, fc1, fc2, ls1, ls2 = names
  for t, s in (("norm1", ln1), ("norm2", ln2)):
    conv.map(f"{target}/{t}/scale", f"{src}.{s}.weight")
    conv.map(f"{target}/{t}/bias", f"{src}.{s}.bias")
  for t, s in (("attn/qkv", qkv), ("attn/proj", proj), ("mlp/fc1", fc1), ("mlp/fc2", fc2)):
    conv.map(f"{target}/{t}/kernel", f"{src}.{s}.weight", core.linear)
    if f"{target}/{t}/bias" in conv.expected:
      conv.map(f"{target}/{t}/bias", f"{src}.{s}.bias")
  if ls1:
    conv.map(f"{target}/ls1/gamma", f"{src}.{ls1}")
    conv.map(f"{target}/ls2/gamma", f"{src}.{ls2}")


def map_split_qkv_block(conv, target, src, names):
  """One transformer block whose source has separate q, k, v Linears (Hugging Face)."""
  ln1, (q, k, v), proj, ln2, fc1, fc2, ls1, ls2 = names
  for t, s in (("norm1", ln1), ("norm2", ln2)):
    conv.map(f"{target}/{t}/scale", f"{src}.{s}.weight")
    conv.map(f"{target}/{t}/bias", f"{src}.{s}.bias")
  w = _qkv_concat(conv, [f"{src}.{n}.weight" for n in (q, k, v)])
  conv.put(f"{target}/attn/qkv/kernel", None if w is None else core.linear(w), f"{src}.{q}/{k}/{v}.weight")
  if f"{target}/attn/qkv/bias" in conv.expected:  # HF's qkv_bias=False models have none
    b = _qkv_concat(conv, [f"{src}.{n}.bias" for n in (q, k, v)])
    conv.put(f"{target}/attn/qkv/bias", b, f"{src}.{q}/{k}/{v}.bias")
  for t, s in (("attn/proj", proj), ("mlp/fc1", fc1), ("mlp/fc2", fc2)):
    conv.map(f"{target}/{t}/kernel", f"{src}.{s}.weight", core.linear)
    conv.map(f"{target}/{t}/bias", f"{src}.{s}.bias")
  if ls1:
    conv.map(f"{target}/ls1/gamma", f"{src}.{ls1}")
    conv.map(f"{target}/ls2/gamma", f"{src}.{ls2}")


def _map_norm(conv, target, src):
  conv.map(f"params/{target}/scale", f"{src}.weight")
  conv.map(f"params/{target}/bias", f"{src}.bias")


# ------------------------------------------------------------------------------- timm


TIMM_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2", None, None)


def arch_timm(state: dict, source: str) -> dict:
  """Architecture of a timm-named ViT state dict (DeiT, DINOv1/v2 hub, BLIP visual)."""
  require(state, ["patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight"], source)
  width, _, p, _ = state["patch_embed.proj.weight"].shape
  depth = count_blocks(state, "blocks.")
  side = grid_from_tokens(state["pos_embed"].shape[1] - 1, source)
  swiglu = "blocks.0.mlp.w12.weight" in state
  hidden = (state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0])
  arch = dict(patch_size=int(p), width=int(width), depth=depth, heads=int(width) // 64,
              mlp_hidden=int(hidden), native_resolution=(side * int(p), side * int(p)),
              layerscale="blocks.0.ls1.gamma" in state)
  if swiglu:
    arch["mlp_act"] = "swiglu"
  if "register_tokens" in state:
    arch["num_registers"] = int(state["register_tokens"].shape[1])
  return arch


def map_timm(conv: core.Conversion, depth: int) -> None:
  conv.map("params/cls_token", "cls_token")
  conv.map("params/pos_embed", "pos_embed")
  if "params/reg_tokens" in conv.expected:
    conv.map("params/reg_tokens", "register_tokens")
  conv.map("params/patch_embed/kernel", "patch_embed.proj.weight", core.conv)
  conv.map("params/patch_embed/bias", "patch_embed.proj.bias")
  swiglu = conv.has("blocks.0.mlp.w12.weight")
  names = list(TIMM_BLOCK)
  if swiglu:
    names[4:6] = ["mlp.w12", "mlp.w3"]
  if conv.has("blocks.0.ls1.gamma"):
    names[6:8] = ["ls1.gamma", "ls2.gamma"]
  for i in range(depth):
    map_fused_qkv_block(conv, f"params/blocks_{i}", f"blocks.{i}", names)
  _map_norm(conv, "norm", "norm")


# ------------------------------------------------------------------------ Hugging Face


def hf_prefix(state: dict, marker: str, candidates: tuple[str, ...]) -> str:
  """The prefix under which `marker` appears ('' for a bare model, 'vit.' in a classifier...)."""
  for prefix in candidates:
    if prefix + marker in state:
      return prefix
  raise core.ConversionError(f"Hugging Face checkpoint without {marker!r} under any of the "
                             f"prefixes {list(candidates)}: not this model type")


def hf_model_type(config: dict) -> str:
  return config.get("model_type", "")


def vision_config(config: dict) -> dict:
  """The vision part of a composite (CLIP, BLIP) HF config, or the config itself."""
  return config.get("vision_config", config) if "vision_config" in config else config


HF_VIT_BLOCK = ("layernorm_before", ("attention.attention.query", "attention.attention.key",
                                     "attention.attention.value"),
                "attention.output.dense", "layernorm_after", "intermediate.dense", "output.dense",
                None, None)
HF_DINOV2_BLOCK = ("norm1", ("attention.attention.query", "attention.attention.key",
                             "attention.attention.value"),
                   "attention.output.dense", "norm2", "mlp.fc1", "mlp.fc2",
                   "layer_scale1.lambda1", "layer_scale2.lambda1")
HF_CLIP_BLOCK = ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2", None, None)
HF_BLIP_BLOCK = ("layer_norm1", "self_attn.qkv", "self_attn.projection", "layer_norm2", "mlp.fc1",
                 "mlp.fc2", None, None)


def hf_common_arch(cfg: dict) -> dict:
  width, p, size = cfg["hidden_size"], cfg["patch_size"], cfg["image_size"]
  size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
  return dict(patch_size=p, width=width, depth=cfg["num_hidden_layers"],
              heads=cfg["num_attention_heads"], native_resolution=size,
              ln_eps=cfg.get("layer_norm_eps", 1e-12))


def hf_act(cfg: dict, source: str) -> str:
  act = cfg.get("hidden_act", "gelu")
  valid = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_new": "gelu_tanh"}
  if act not in valid:
    raise core.ConversionError(f"{source}: hidden_act {act!r} not supported; supported: {sorted(valid)}")
  return valid[act]


def map_hf_embeddings(conv, pre: str, cls_key: str, pos_key: str, patch_key: str,
                      reshape_cls=False, reshape_pos=False):
  conv.map("params/cls_token", pre + cls_key, (lambda x: x.reshape(1, 1, -1)) if reshape_cls else None)
  conv.map("params/pos_embed", pre + pos_key, (lambda x: x[None]) if reshape_pos else None)
  conv.map("params/patch_embed/kernel", pre + patch_key + ".weight", core.conv)
  if "params/patch_embed/bias" in conv.expected:
    conv.map("params/patch_embed/bias", pre + patch_key + ".bias")
