"""DINOv2 ViT-S/B/L/g-14, with or without registers: torch-hub files and HF folders.

original: `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, flat; `mask_token` ignored. Or a training run's
  `teacher_checkpoint.pth`: its teacher backbone (blocks unchunked), its DINO and iBOT heads ignored. Position
  embeddings are resized as the hub models do: F.interpolate(scale_factor=(g + 0.1) / M), and with
  registers (the `_reg` builders pass interpolate_offset=0, interpolate_antialias=True)
  F.interpolate(size=grid, antialias=True).
hf: `Dinov2Model` (resized with F.interpolate(size=grid)) and `Dinov2WithRegistersModel`
  (size=grid, antialias=True) folders, e.g. facebook/dinov2-base.
"""
import re

from convert import core, vit

FORMATS = ("original", "hf")
SIZES = {384: "s", 768: "b", 1024: "l", 1536: "g"}


def add_arguments(parser):
  pass


def model_name(width: int, registers: int, source: str) -> str:
  if width not in SIZES:
    raise core.ConversionError(f"{source}: width {width} is not a DINOv2 size {sorted(SIZES)}")
  return f"dinov2_vit{SIZES[width]}14" + (f"_reg{registers}" if registers else "")


def convert(state_dict, *, source="checkpoint"):
  arch = vit.arch_timm(state_dict, source)
  name = model_name(arch["width"], arch.get("num_registers", 0), source)
  arch.update(posemb="size_antialias" if arch.get("num_registers") else "dino_offset")
  conv = vit.new_conversion(state_dict, name, arch, source)
  vit.map_timm(conv, arch["depth"])
  conv.ignore(r"mask_token|dino_head\..*|ibot_head\..*")  # a training checkpoint's heads
  return name, arch, conv.finish()


def convert_hf(state, config, source):
  model_type = vit.hf_model_type(config)
  if model_type not in ("dinov2", "dinov2_with_registers"):
    raise core.ConversionError(f"{source}: model_type {model_type!r} is not dinov2 / dinov2_with_registers")
  pre = vit.hf_prefix(state, "embeddings.cls_token", ("", "dinov2.", "dinov2_with_registers."))
  registers = config.get("num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0
  swiglu = config.get("use_swiglu_ffn", False)
  mlp_hidden = int(config["hidden_size"] * config.get("mlp_ratio", 4))
  if swiglu:  # HF (as the hub) rounds the SwiGLU hidden size: int(2/3 h) up to a multiple of 8
    mlp_hidden = (int(mlp_hidden * 2 / 3) + 7) // 8 * 8
  arch = dict(vit.hf_common_arch(config), mlp_hidden=mlp_hidden, layerscale=True,
              mlp_act="swiglu" if swiglu else vit.hf_act(config, source),
              qkv_bias=config.get("qkv_bias", True), num_registers=registers,
              posemb="size_antialias" if registers else "size")
  name = model_name(arch["width"], registers, source)
  conv = vit.new_conversion(state, name, arch, source)
  vit.map_hf_embeddings(conv, pre + "embeddings.", "cls_token", "position_embeddings",
                        "patch_embeddings.projection")
  if registers:
    conv.map("params/reg_tokens", pre + "embeddings.register_tokens")
  names = list(vit.HF_DINOV2_BLOCK)
  if swiglu:
    names[4:6] = ["mlp.weights_in", "mlp.weights_out"]
  for i in range(arch["depth"]):
    vit.map_split_qkv_block(conv, f"params/blocks_{i}", f"{pre}encoder.layer.{i}", names)
  vit._map_norm(conv, "norm", pre + "layernorm")
  conv.ignore(r"(dinov2\.|dinov2_with_registers\.)?embeddings\.mask_token|classifier\..*")
  return name, arch, conv.finish()


def from_training_checkpoint(state: dict) -> dict:
  """The backbone of DINOv2's own training output (`eval/training_N/teacher_checkpoint.pth`:
  {'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}), as the hub file names it: without
  `backbone.`, and with chunked blocks (`blocks.CHUNK.I.*`, block_chunks > 0) numbered `blocks.I.*`."""
  if not any(k.startswith("backbone.") for k in state):
    return state
  return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k.removeprefix("backbone.")): v
          for k, v in state.items()}


def from_checkpoint(raw, hf_config, fmt, args):
  if fmt == "hf":
    return convert_hf(raw, hf_config, args.checkpoint)
  state = core.flatten_state_dict(core.unwrap(raw, ["model", "state_dict", "teacher"]))
  return convert(from_training_checkpoint(state), source=args.checkpoint)
