"""DINOv3 ViTs: the official release, Hugging Face `DINOv3ViTModel` folders, and MedDINOv3.

  original   the official flat state dict (`dinov3_vit{s,b,l}16_pretrain_lvd1689m-*.pth`):
             `blocks.{i}.attn.qkv.{weight,bias,bias_mask}`, `storage_tokens`, `rope_embed.periods`.
             A MedDINOv3 checkpoint (`{'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}`)
             is read from its teacher backbone; the DINO and iBOT heads are ignored. So is the
             backbone of a MedDINOv3 segmentation network trained by nnU-Net (its
             `checkpoint_final.pth`: `{'network_weights': {'dino_encoder.*', 'up_projection.*'}}`,
             Primus_Multiscale); its decoder is ignored here (`mfjax segment --import-nnunet`
             converts the whole network, `segmentation_network`).
  hf         transformers `DINOv3ViTModel`: separate q/k/v projections, `(model.)layer.{i}.*`.
The SAT-493M ViT-L/16 also holds `local_cls_norm.*`, the norm of local crops' CLS token in training
(never used in eval): ignored. The SwiGLU-MLP variants (ViT-S+/16, ViT-H+/16: `blocks.{i}.mlp.w1/w2/w3`)
are not supported and are refused as such.
The key bias is masked in the released models (`bias_mask` = [1, 0, 1] per third, HF `key_bias`
False): the converted bias holds zeros there and the model keeps it at zero. The RoPE periods
are not parameters; a checkpoint's `periods` are checked against the model's schedule.
"""
import re

import numpy as np

from convert import core

FORMATS = ("original", "hf")
WIDTHS = {384: "dinov3_vits16", 768: "dinov3_vitb16", 1024: "dinov3_vitl16"}
MEDDINOV3 = "meddinov3_vitb16"
HEADS_IGNORED = (r"dino_head\..*", r"ibot_head\..*", r"up_projection\.decode\..*")
TRAINING_ONLY = r"local_cls_norm\.(weight|bias)"  # SAT-493M ViT-L: local crops' CLS norm, unused in eval
SWIGLU_VARIANTS = {384: "ViT-S+/16", 1280: "ViT-H+/16"}
BACKBONE_PREFIXES = ("backbone.", "dino_encoder.")  # MedDINOv3's pretraining teacher, its nnU-Net network
WRAPPERS = ("teacher", "model", "network_weights")


def add_arguments(parser):
  parser.add_argument("--ln-eps", type=float, default=None,
                      help="LayerNorm epsilon; default: 1e-5 for the official release (its 'layernormbf16'), "
                           "1e-6 for MedDINOv3 ('layernorm'), the config's layer_norm_eps for HF folders")
  parser.add_argument("--rope-dtype", default="float32", choices=["float32", "bfloat16"],
                      help="precision of the RoPE angles and rotation: float32 (the hub models, timm, HF; "
                           "default) or bfloat16 (the original code's training default, which MedDINOv3 ran with)")
  parser.add_argument("--rope-periods", default="computed", choices=["computed", "stored"],
                      help="RoPE periods: computed from the schedule (timm, transformers; default) or the "
                           "checkpoint's stored rope_embed.periods, which the original hub code uses (the release "
                           "stores them rounded to bfloat16)")


def _qkv_bias_mask(mask: np.ndarray, key: str) -> bool:
  """True when `mask` masks the key bias ([1, 0, 1] per third), False when it masks nothing."""
  third = mask.shape[0] // 3
  masked = np.concatenate([np.ones(third), np.zeros(third), np.ones(third)])
  if mask.shape == masked.shape and np.array_equal(mask, masked):
    return True
  if np.all(mask == 1):
    return False
  raise core.ConversionError(f"{key}: expected [1]*{third} + [0]*{third} + [1]*{third} (masked key bias) "
                             f"or all ones, got {np.unique(mask)} (an uninitialized buffer?)")


def _check_periods(periods: np.ndarray, head_dim: int, base: float, key: str) -> str | None:
  """A problem message when stored RoPE periods are not base ** (2i / (head_dim / 2)) (bf16 rounding allowed)."""
  expected = float(base) ** (2 * np.arange(head_dim // 4) / (head_dim // 2))
  if periods.shape != expected.shape:
    return f"{key}: shape {periods.shape}, expected {expected.shape} (head dim {head_dim})"
  if not np.allclose(periods.astype(np.float64), expected, rtol=2.0 ** -7, atol=0):
    got = np.round(periods.astype(np.float64), 4).tolist()
    return f"{key}: values {got} are not the RoPE periods of base {base} ({np.round(expected, 4).tolist()})"
  return None


def _layout(state_dict: dict, fmt: str) -> tuple[str, str]:
  """(prefix of the backbone keys, prefix of the blocks) of a state dict."""
  if fmt == "hf":
    if any(k.startswith("model.layer.") for k in state_dict):
      return "", "model.layer."
    return "", "layer."  # the Hub files, written before transformers 5 renamed layer. -> model.layer.
  prefix = next((p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
  return prefix, prefix + "blocks."


def convert(state_dict: dict[str, np.ndarray], fmt: str = "original", model: str = "dinov3_vitb16",
            source: str = "checkpoint", **overrides) -> dict:
  """Flax variables of `models.create(model, **overrides)` from a DINOv3 state dict in format `fmt`."""
  from mfjax import models
  module = models.create(model, **overrides)
  c = core.Conversion(state_dict, models.abstract_variables(module), source)
  prefix, blocks = _layout(state_dict, fmt)
  value_problems = []
  dense = lambda target, key: (c.map(f"params/{target}/kernel", f"{key}.weight", core.linear),
                               c.map(f"params/{target}/bias", f"{key}.bias"))
  norm = lambda target, key: (c.map(f"params/{target}/scale", f"{key}.weight"),
                              c.map(f"params/{target}/bias", f"{key}.bias"))
  depth = module.depth if module.num_blocks is None else module.num_blocks

  if fmt == "original":
    c.map("params/cls_token", prefix + "cls_token")
    if module.num_storage:
      c.map("params/storage_tokens", prefix + "storage_tokens")
    c.map("params/mask_token", prefix + "mask_token")
    c.map("params/patch_embed/kernel", prefix + "patch_embed.proj.weight", core.conv)
    c.map("params/patch_embed/bias", prefix + "patch_embed.proj.bias")
    periods = c.take(prefix + "rope_embed.periods")
    if periods is not None:
      value_problems.append(_check_periods(periods, module.width // module.heads, module.rope_base,
                                           prefix + "rope_embed.periods"))
    for i in range(depth):
      src, dst = f"{blocks}{i}", f"blocks_{i}"
      norm(f"{dst}/norm1", f"{src}.norm1")
      c.map(f"params/{dst}/attn/qkv/kernel", f"{src}.attn.qkv.weight", core.linear)
      if module.qkv_bias:
        bias = c.take(f"{src}.attn.qkv.bias")
        if c.has(f"{src}.attn.qkv.bias_mask"):
          mask = c.take(f"{src}.attn.qkv.bias_mask")
          if bias is not None and mask.shape == bias.shape:
            bias = bias * mask
        c.put(f"params/{dst}/attn/qkv/bias", bias, f"{src}.attn.qkv.bias")
      dense(f"{dst}/attn/proj", f"{src}.attn.proj")
      c.map(f"params/{dst}/ls1/gamma", f"{src}.ls1.gamma")
      norm(f"{dst}/norm2", f"{src}.norm2")
      dense(f"{dst}/mlp/fc1", f"{src}.mlp.fc1")
      dense(f"{dst}/mlp/fc2", f"{src}.mlp.fc2")
      c.map(f"params/{dst}/ls2/gamma", f"{src}.ls2.gamma")
    norm("norm", prefix + "norm")
    for pattern in HEADS_IGNORED:
      c.ignore(pattern)
    c.ignore(re.escape(prefix) + TRAINING_ONLY)
  else:
    c.map("params/cls_token", "embeddings.cls_token")
    if module.num_storage:
      c.map("params/storage_tokens", "embeddings.register_tokens")
    else:  # transformers keeps an empty (1, 0, width) tensor
      tokens = c.take("embeddings.register_tokens") if c.has("embeddings.register_tokens") else None
      if tokens is not None and tokens.size:
        raise core.ConversionError(f"embeddings.register_tokens {tuple(tokens.shape)}, but config.json has "
                                   "num_register_tokens=0")
    c.map("params/mask_token", "embeddings.mask_token", lambda t: t.reshape(1, -1))
    c.map("params/patch_embed/kernel", "embeddings.patch_embeddings.weight", core.conv)
    c.map("params/patch_embed/bias", "embeddings.patch_embeddings.bias")
    for i in range(depth):
      src, dst = f"{blocks}{i}", f"blocks_{i}"
      norm(f"{dst}/norm1", f"{src}.norm1")
      weights = [c.take(f"{src}.attention.{n}_proj.weight") for n in "qkv"]
      if all(w is not None for w in weights):
        c.put(f"params/{dst}/attn/qkv/kernel", core.linear(np.concatenate(weights, axis=0)),
              f"{src}.attention.{{q,k,v}}_proj.weight")
      if module.qkv_bias:
        q, v = c.take(f"{src}.attention.q_proj.bias"), c.take(f"{src}.attention.v_proj.bias")
        k_key = f"{src}.attention.k_proj.bias"
        k = c.take(k_key) if module.k_bias else None
        if q is not None and v is not None:
          c.put(f"params/{dst}/attn/qkv/bias", np.concatenate([q, np.zeros_like(q) if k is None else k, v]),
                f"{src}.attention.{{q,k,v}}_proj.bias")
      dense(f"{dst}/attn/proj", f"{src}.attention.o_proj")
      c.map(f"params/{dst}/ls1/gamma", f"{src}.layer_scale1.lambda1")
      norm(f"{dst}/norm2", f"{src}.norm2")
      dense(f"{dst}/mlp/fc1", f"{src}.mlp.up_proj")
      dense(f"{dst}/mlp/fc2", f"{src}.mlp.down_proj")
      c.map(f"params/{dst}/ls2/gamma", f"{src}.layer_scale2.lambda1")
    norm("norm", "norm")

  problems = [p for p in value_problems if p]
  bad_values = f"\nbad values ({len(problems)}):\n  " + "\n  ".join(problems) if problems else ""
  try:
    variables = c.finish()
  except core.ConversionError as e:
    raise core.ConversionError(f"{e}{bad_values}") from None
  if bad_values:
    raise core.ConversionError(f"cannot convert {source}:{bad_values}")
  return variables


DECODER_PREFIX = "up_projection.decode."  # MedDINOv3's PatchDecode in Primus_Multiscale


def convert_decoder(state: dict[str, np.ndarray], in_channels: int, patch_size: int,
                    source: str = "checkpoint") -> dict:
  """Flax params of `heads.PatchDecoder` from MedDINOv3's PatchDecode (`up_projection.decode.*`):
  log2(patch) stages `decode.{s}` = [ConvTranspose2d(2, 2), LayerNormNd, GELU], then the 1x1
  Conv2d `decode.{stages}` whose output channels are the classes."""
  import jax
  from mfjax.models import heads
  stages = int(round(np.log2(patch_size)))
  classifier = state.get(f"{DECODER_PREFIX}{stages}.weight")
  if classifier is None or classifier.ndim != 4:
    found = sorted(k for k in state if k.startswith(DECODER_PREFIX))
    raise core.ConversionError(f"{source}: no {DECODER_PREFIX}{stages}.weight (the 1x1 classifier after "
                               f"{stages} upsampling stages for patch size {patch_size}); decoder keys found: "
                               f"{found[:12] or 'none'}")
  first = state.get(f"{DECODER_PREFIX}0.0.weight")
  if first is not None and first.ndim == 4 and first.shape[0] != in_channels:
    raise core.ConversionError(f"{source}: {DECODER_PREFIX}0.0.weight takes {first.shape[0]} channels, but the "
                               f"backbone's interaction blocks give {in_channels} (width x number of blocks); "
                               "give the interaction indices the network was trained with")
  module = heads.PatchDecoder(int(classifier.shape[0]), patch_size)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1, 1, in_channels),
                                                                                      np.float32))
  c = core.Conversion(state, abstract, source)
  transposed = lambda w: np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1))  # (in, out, 2, 2)
  for s in range(stages):
    key = f"{DECODER_PREFIX}{s}"
    c.map(f"params/up_{s}/up/kernel", f"{key}.0.weight", transposed)
    c.map(f"params/up_{s}/bias", f"{key}.0.bias")
    c.map(f"params/norm_{s}/scale", f"{key}.1.weight")
    c.map(f"params/norm_{s}/bias", f"{key}.1.bias")
  c.map("params/classifier/kernel", f"{DECODER_PREFIX}{stages}.weight", lambda w: np.ascontiguousarray(w[:, :, 0, 0].T))
  c.map("params/classifier/bias", f"{DECODER_PREFIX}{stages}.bias")
  return c.finish()["params"]


def segmentation_network(raw, source: str, interaction_indices=(2, 5, 8, 11), rope_dtype: str = "bfloat16",
                         ln_eps: float | None = None) -> tuple[str, dict, dict]:
  """(backbone model name, its overrides, `heads.Segmenter` params) of a whole MedDINOv3
  Primus_Multiscale network: nnU-Net's checkpoint_final.pth (`network_weights`: `dino_encoder.*`
  and `up_projection.decode.*`). Any other key (a fork's `input_adapter`, ...) is an error."""
  state = core.flatten_state_dict(core.unwrap(raw, WRAPPERS))
  if not any(k.startswith("dino_encoder.") for k in state):
    raise core.ConversionError(f"{source}: no dino_encoder.* keys: not a MedDINOv3 Primus network "
                               f"(first keys: {sorted(state)[:5]})")
  decoder = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
  backbone = {k: v for k, v in state.items() if k not in decoder}
  model, settings = _original_settings(backbone)
  overrides = _overrides(model, settings, ln_eps, rope_dtype)
  encoder = convert(backbone, "original", model, source, **overrides)["params"]
  spec = {**_registered(model), **overrides}
  bad = [i for i in interaction_indices if not 0 <= i < spec["depth"]]
  if bad:
    raise core.ConversionError(f"interaction indices {list(interaction_indices)}: blocks {bad} do not exist in the "
                               f"{spec['depth']}-block backbone")
  head = convert_decoder(decoder, spec["width"] * len(interaction_indices), spec["patch_size"], source)
  return model, overrides, {"foundation": encoder, "decoder": head}


def _overrides(model: str, settings: dict, ln_eps: float | None, rope_dtype: str) -> dict:
  """The constructor overrides of `model`: the checkpoint's `settings` and the options, where they
  differ from the registered model."""
  settings = {**settings, "rope_dtype": rope_dtype, **({"ln_eps": ln_eps} if ln_eps is not None else {})}
  registered = _registered(model)
  return {k: v for k, v in settings.items() if registered[k] != v}


def _registered(model: str) -> dict:
  from mfjax.models import dinov3
  import dataclasses
  defaults = {f.name: f.default for f in dataclasses.fields(dinov3.Model) if f.name not in ("parent", "name")}
  return {**defaults, **dinov3.MODELS[model]}


def _original_settings(state: dict) -> tuple[str, dict]:
  """(model name, settings read from the tensors) of an official or MedDINOv3 state dict."""
  prefix, blocks = _layout(state, "original")
  cls, patch = state.get(prefix + "cls_token"), state.get(prefix + "patch_embed.proj.weight")
  if cls is not None and cls.ndim == 3:
    width = int(cls.shape[-1])
  elif patch is not None and patch.ndim == 4:
    width = int(patch.shape[0])
  else:
    raise core.ConversionError(f"not a DINOv3 checkpoint: neither {prefix}cls_token (1, 1, width) nor "
                               f"{prefix}patch_embed.proj.weight (width, 3, 16, 16) found "
                               f"(first keys: {sorted(state)[:5]})")
  if f"{blocks}0.mlp.w1.weight" in state:
    variant = SWIGLU_VARIANTS.get(width, f"width-{width}") if not prefix else f"width-{width} {prefix}*"
    raise core.ConversionError(f"{variant} DINOv3 checkpoint with a SwiGLU MLP ({blocks}N.mlp.w1/w2/w3): not "
                               f"supported; the registered DINOv3 models have a GELU MLP (mlp.fc1/fc2)")
  if prefix:
    if width != 768:
      raise core.ConversionError(f"a MedDINOv3 checkpoint ({prefix}*) of width {width}: only the "
                                 f"ViT-B/16 ({MEDDINOV3}, width 768) is registered")
    model = MEDDINOV3
  elif width in WIDTHS:
    model = WIDTHS[width]
  else:
    raise core.ConversionError(f"DINOv3 checkpoint of width {width}: no registered model "
                               f"(known widths {sorted(WIDTHS)} -> {sorted(WIDTHS.values())})")
  settings = {"qkv_bias": f"{blocks}0.attn.qkv.bias" in state}
  mask_key = f"{blocks}0.attn.qkv.bias_mask"
  if settings["qkv_bias"]:
    # A masked bias (the released models) stores bias_mask; a plain Linear has a real key bias.
    settings["k_bias"] = not _qkv_bias_mask(state[mask_key], mask_key) if mask_key in state else True
  storage = state.get(prefix + "storage_tokens")
  if storage is None:  # DINOv3's vit_*(n_storage_tokens=0), e.g. MedDINOv3's "original DINOv3" networks
    settings["num_storage"] = 0
  elif storage.ndim == 3:
    settings["num_storage"] = int(storage.shape[1])
  return model, settings


def _hf_settings(config: dict) -> tuple[str, dict]:
  if config.get("model_type") != "dinov3_vit":
    raise core.ConversionError(f"config.json has model_type {config.get('model_type')!r}, not 'dinov3_vit'")
  unsupported = {k: config[k] for k, ok in (("use_gated_mlp", False), ("proj_bias", True), ("mlp_bias", True),
                                            ("hidden_act", "gelu"), ("num_channels", 3))
                 if k in config and config[k] != ok}
  if config.get("query_bias", True) != config.get("value_bias", True):
    unsupported["query_bias/value_bias"] = (config.get("query_bias"), config.get("value_bias"))
  if unsupported:
    raise core.ConversionError(f"unsupported DINOv3 settings in config.json: {unsupported}")
  width = config.get("hidden_size", 384)
  if width not in WIDTHS:
    raise core.ConversionError(f"DINOv3 config with hidden_size {width}: no registered model "
                               f"(known widths {sorted(WIDTHS)} -> {sorted(WIDTHS.values())})")
  image_size = config.get("image_size", 224)
  qkv_bias = config.get("query_bias", True)
  settings = dict(width=width, depth=config.get("num_hidden_layers", 12), heads=config.get("num_attention_heads", 6),
                  mlp_hidden=config.get("intermediate_size", 4 * width), patch_size=config.get("patch_size", 16),
                  ln_eps=config.get("layer_norm_eps", 1e-5), num_storage=config.get("num_register_tokens", 0),
                  qkv_bias=qkv_bias, rope_base=float(config.get("rope_theta", 100.0)),
                  rope_shift=config.get("pos_embed_shift"), rope_jitter=config.get("pos_embed_jitter"),
                  rope_rescale=config.get("pos_embed_rescale", 2.0),
                  native_resolution=tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size,) * 2)
  if qkv_bias:
    settings["k_bias"] = bool(config.get("key_bias", False))
  return WIDTHS[width], settings


def from_checkpoint(raw, hf_config, fmt, args):
  if fmt == "original":
    state = core.flatten_state_dict(core.unwrap(raw, WRAPPERS))
    model, settings = _original_settings(state)
  else:
    state = raw
    model, settings = _hf_settings(hf_config)
  overrides = _overrides(model, settings, args.ln_eps, args.rope_dtype)
  if getattr(args, "rope_periods", "computed") == "stored":
    key = next((k for k in state if k.endswith("rope_embed.periods")), None) if fmt == "original" else None
    if key is None:
      raise core.ConversionError(f"--rope-periods stored: {args.checkpoint} holds no rope_embed.periods"
                                 + (" (HF folders do not store them)" if fmt == "hf" else ""))
    overrides["rope_periods"] = tuple(float(p) for p in np.asarray(state[key], np.float32))
  elif fmt == "original" and any(k.endswith("rope_embed.periods") for k in state):
    print("note: RoPE periods computed from the schedule, as timm and transformers do; the original hub code "
          "uses the checkpoint's stored ones, rounded to bfloat16 (up to 4e-3 off): --rope-periods stored "
          "for that")
  kind = "MedDINOv3" if model == MEDDINOV3 else "DINOv3"
  variables = convert(state, fmt, model, source=f"{args.checkpoint} ({fmt} {kind} checkpoint)", **overrides)
  return model, overrides, variables
