"""BLIP ViT-B/16 image encoder: BLIP's `model_base.pth` and HF `BlipVisionModel`/`BlipModel` folders.

original: {'model': {...}}; only the exact prefix `visual_encoder.` is converted by default and
  everything else (text encoder/decoder, projections, queues, and the momentum copy
  `visual_encoder_m.*`) is ignored explicitly. `--momentum-encoder` converts `visual_encoder_m.*`
  instead: the paper's loader (prefix match `visual_encoder`) ended up with the momentum weights.
hf: a folder whose config has the vision part; `layer_norm_eps` comes from config.json.
The position embedding is resized with F.interpolate(size=grid) as BLIP's loader and HF do.
"""
from convert import core, vit

FORMATS = ("original", "hf")
NAME = "blip_vitb16"


def add_arguments(parser):
  parser.add_argument("--momentum-encoder", action="store_true",
                      help="convert visual_encoder_m.* (the EMA copy the paper's code loaded)")
  parser.add_argument("--pooled", choices=["cls", "first_patch"], default="cls",
                      help="feature for linear probes: the CLS token (default) or the first patch "
                           "token, as the paper's code took by mistake")


def convert(state_dict, *, momentum_encoder=False, pooled="cls", source="checkpoint"):
  prefix = "visual_encoder_m." if momentum_encoder else "visual_encoder."
  if not any(k.startswith(prefix) for k in state_dict):
    raise core.ConversionError(f"{source}: no keys under {prefix!r}" +
                               (" (this checkpoint has no momentum encoder)" if momentum_encoder else ""))
  state = {k[len(prefix):] if k.startswith(prefix) else "other:" + k: v for k, v in state_dict.items()}
  arch = dict(vit.arch_timm(state, source), posemb="size", pooled=pooled)
  conv = vit.new_conversion(state, NAME, arch, source)
  vit.map_timm(conv, arch["depth"])
  conv.ignore(r"other:.*")
  return NAME, arch, conv.finish()


def convert_hf(state, config, source, pooled="cls"):
  if vit.hf_model_type(config) not in ("blip", "blip_vision_model", "blip-2"):
    raise core.ConversionError(f"{source}: model_type {config.get('model_type')!r} is not a HF BLIP model")
  cfg = {"image_size": 384, "patch_size": 16, "layer_norm_eps": 1e-5, **vit.vision_config(config)}
  pre = vit.hf_prefix(state, "embeddings.class_embedding", ("vision_model.", ""))
  arch = dict(vit.hf_common_arch(cfg), mlp_hidden=cfg["intermediate_size"], mlp_act=vit.hf_act(cfg, source),
              posemb="size", pooled=pooled)
  conv = vit.new_conversion(state, NAME, arch, source)
  vit.map_hf_embeddings(conv, pre + "embeddings.", "class_embedding", "position_embedding",
                        "patch_embedding")
  for i in range(arch["depth"]):
    vit.map_fused_qkv_block(conv, f"params/blocks_{i}", f"{pre}encoder.layers.{i}", vit.HF_BLIP_BLOCK)
  vit._map_norm(conv, "norm", pre + "post_layernorm")
  if pre:
    conv.ignore(r"(?!vision_model\.).*")  # text model, projections and heads of a composite folder
  return NAME, arch, conv.finish()


def from_checkpoint(raw, hf_config, fmt, args):
  if fmt == "hf":
    return convert_hf(raw, hf_config, args.checkpoint, args.pooled)
  state = core.flatten_state_dict(core.unwrap(raw, ["model"]))
  return convert(state, momentum_encoder=args.momentum_encoder, pooled=args.pooled, source=args.checkpoint)
