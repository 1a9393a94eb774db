"""OpenCLIP image towers: the full OpenCLIP state dict (text tower ignored) and HF CLIP folders.

original: `open_clip_pytorch_model.bin` / `open_clip_model.safetensors` / a torch.save of
  `model.state_dict()` (keys `visual.*` plus the text tower), or a visual-only state dict.
  Position embeddings are resized as open_clip does at load: F.interpolate(size, antialias=True).
  The MLP activation is not in the tensors: GELU unless `--act quick_gelu` (OpenAI's CLIP weights,
  open_clip's `*-quickgelu` models). A folder or Hub repo holding both open_clip's file and an HF
  CLIP model (the laion repos) is read as HF; `--format original` reads open_clip's file.
hf: `CLIPVisionModel`, `CLIPVisionModelWithProjection` or `CLIPModel` folders (text model
  ignored); resized as HF does: F.interpolate(size=grid).
"""
from convert import core, vit

FORMATS = ("original", "hf")
NAME = "openclip_vitb16"
OPENCLIP_BLOCK = ("ln_1", "attn.in_proj", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj", None, None)
ORIGINAL_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # in laion Hub repos
ACTIVATIONS = ("gelu", "quick_gelu")
# Attention heads are not in the tensors either: open_clip's configs give width / head_width, with
# head_width 64 except for these widths (ViT-H-14: 80, ViT-g-14: 88, ViT-bigG-14: 104; 16 heads each).
HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
TEXT_TOWER = (r"token_embedding\..*|positional_embedding|transformer\..*|ln_final\..*|text_projection"
              r"|logit_scale|logit_bias|attn_mask|text\..*")


def add_arguments(parser):
  parser.add_argument("--act", choices=ACTIVATIONS, default=None,
                      help="MLP activation, which an open_clip state dict does not record: gelu (default; "
                           "LAION models) or quick_gelu (OpenAI's CLIP weights, open_clip's *-quickgelu "
                           "models). HF folders read it from config.json (hidden_act)")
  parser.add_argument("--heads", type=int, default=None,
                      help="attention heads, which an open_clip state dict does not record either: default "
                           "width / head_width as in open_clip's configs (ViT-B: 12, ViT-L/H/g/bigG: 16); give it "
                           "for a model of your own config. HF folders read it from config.json")


def _fix_in_proj(state: dict) -> dict:
  # open_clip's nn.MultiheadAttention names its fused qkv `in_proj_weight`, not `in_proj.weight`.
  return {k.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias"): v
          for k, v in state.items()}


def arch_of(state_dict, source, act="gelu", heads=None) -> dict:
  state = _fix_in_proj(state_dict)
  pre = "visual." if "visual.conv1.weight" in state else ""
  vit.require(state, [pre + "conv1.weight", pre + "positional_embedding",
                      pre + "transformer.resblocks.0.attn.in_proj.weight"], source)
  width, _, p, _ = state[pre + "conv1.weight"].shape
  side = vit.grid_from_tokens(state[pre + "positional_embedding"].shape[0] - 1, source)
  heads = heads or int(width) // HEAD_WIDTH.get(int(width), 64)
  if int(width) % heads:
    raise core.ConversionError(f"{source}: width {int(width)} does not split into {heads} attention heads")
  return dict(patch_size=int(p), width=int(width), depth=vit.count_blocks(state, f"{pre}transformer.resblocks."),
              heads=heads, mlp_hidden=int(state[pre + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
              mlp_act=act, native_resolution=(side * int(p),) * 2,
              proj_dim=int(state[pre + "proj"].shape[1]) if pre + "proj" in state else 0)


def convert(state_dict, *, source="checkpoint", act="gelu", heads=None):
  state = _fix_in_proj(state_dict)
  pre = "visual." if "visual.conv1.weight" in state else ""
  arch = arch_of(state, source, act, heads)
  depth = arch["depth"]
  conv = vit.new_conversion(state, NAME, arch, source)
  conv.map("params/cls_token", pre + "class_embedding", lambda x: x.reshape(1, 1, -1))
  conv.map("params/pos_embed", pre + "positional_embedding", lambda x: x[None])
  conv.map("params/patch_embed/kernel", pre + "conv1.weight", core.conv)
  vit._map_norm(conv, "norm_pre", pre + "ln_pre")
  for i in range(depth):
    vit.map_fused_qkv_block(conv, f"params/blocks_{i}", f"{pre}transformer.resblocks.{i}", OPENCLIP_BLOCK)
  vit._map_norm(conv, "norm", pre + "ln_post")
  if arch["proj_dim"]:
    conv.map("params/proj", pre + "proj")
  if pre:
    conv.ignore(TEXT_TOWER)
  return NAME, arch, conv.finish()


def convert_hf(state, config, source):
  if vit.hf_model_type(config) not in ("clip", "clip_vision_model"):
    raise core.ConversionError(f"{source}: model_type {config.get('model_type')!r} is not a HF CLIP model")
  cfg = vit.vision_config(config)
  cfg = {"image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-5, **cfg}
  pre = vit.hf_prefix(state, "embeddings.class_embedding", ("vision_model.", ""))
  has_proj = "visual_projection.weight" in state
  arch = dict(vit.hf_common_arch(cfg), mlp_hidden=cfg["intermediate_size"], mlp_act=vit.hf_act(cfg, source),
              patch_bias=False, pre_norm=True, posemb="size",
              proj_dim=int(state["visual_projection.weight"].shape[0]) if has_proj else 0)
  conv = vit.new_conversion(state, NAME, arch, source)
  vit.map_hf_embeddings(conv, pre + "embeddings.", "class_embedding", "position_embedding.weight",
                        "patch_embedding", reshape_cls=True, reshape_pos=True)
  vit._map_norm(conv, "norm_pre", pre + "pre_layrnorm")
  for i in range(arch["depth"]):
    vit.map_split_qkv_block(conv, f"params/blocks_{i}", f"{pre}encoder.layers.{i}", vit.HF_CLIP_BLOCK)
  vit._map_norm(conv, "norm", pre + "post_layernorm")
  if has_proj:
    conv.map("params/proj", "visual_projection.weight", core.linear)
  conv.ignore(r"(vision_model\.)?embeddings\.position_ids|text_model\..*|text_projection\..*|logit_scale")
  return NAME, arch, conv.finish()


def from_checkpoint(raw, hf_config, fmt, args):
  if fmt == "hf":
    act = vit.hf_act(vit.vision_config(hf_config), args.checkpoint)
    if args.act and args.act != act:
      hidden_act = vit.vision_config(hf_config).get("hidden_act", "gelu")
      raise core.ConversionError(f"--act {args.act} given, but {args.checkpoint}'s config.json has hidden_act "
                                 f"{hidden_act!r} ({act})")
    heads = vit.vision_config(hf_config).get("num_attention_heads")
    if args.heads and args.heads != heads:
      raise core.ConversionError(f"--heads {args.heads} given, but {args.checkpoint}'s config.json has "
                                 f"num_attention_heads {heads}")
    return convert_hf(raw, hf_config, args.checkpoint)
  if args.heads is not None and args.heads < 1:
    raise core.ConversionError(f"--heads {args.heads}: at least 1")
  return convert(core.flatten_state_dict(core.unwrap(raw, ["state_dict", "model"])), source=args.checkpoint,
                 act=args.act or "gelu", heads=args.heads)
