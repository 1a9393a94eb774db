"""The ViT family: DeiT, DINOv1, DINOv2 (+registers, SwiGLU for g), OpenCLIP visual, BLIP visual.

One Linen module; each released model is a set of constructor fields in `MODELS`. What each
model exposes follows the benchmark's code (see README, "Models"):
  pooled  the feature a linear probe sees: the final-normed CLS token (OpenCLIP: projected),
          or BLIP's first patch token when `pooled="first_patch"` (the paper's mistake).
  tokens  the patch tokens a stacked classifier consumes: final-normed ("normed") or the
          last block's output before the final norm ("prenorm": DINOv2, OpenCLIP).
"""
import flax.linen as nn
import jax.numpy as jnp

from mfjax.models import layers, posemb


class Model(nn.Module):
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_hidden: int = 3072
  mlp_act: str = "gelu"          # gelu | quick_gelu | swiglu
  qkv_bias: bool = True
  patch_bias: bool = True
  ln_eps: float = 1e-6
  layerscale: bool = False
  num_registers: int = 0
  pre_norm: bool = False         # OpenCLIP's ln_pre
  proj_dim: int | None = None    # OpenCLIP's visual projection of the pooled CLS
  native_resolution: tuple[int, int] = (224, 224)
  posemb: str = "size_antialias"  # see posemb.POSEMB_METHODS
  pooled: str = "cls"            # cls | first_patch
  tokens: str = "normed"         # normed | prenorm
  num_blocks: int | None = None  # keep only the first k blocks (decapitation)
  drop_path: float = 0.0
  dtype: str = "float32"         # compute dtype; parameters stay float32
  attn_impl: str | None = None   # the attention core: see layers.attention_fn
  attn_query_chunk: int = 0      # > 0: attend this many queries at a time (memory at 1024 px)
  remat: bool = False
  remat_policy: str = "block"    # what remat keeps: block | dots | attention (layers.REMAT_POLICIES)
  scan_blocks: bool = False      # lax.scan over the blocks (shorter compiles; not with drop-path in training)

  @property
  def native_grid(self) -> tuple[int, int]:
    return (self.native_resolution[0] // self.patch_size, self.native_resolution[1] // self.patch_size)

  def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of `tokens` for an input of `image_size`."""
    return (image_size[0] // self.patch_size, image_size[1] // self.patch_size)

  @nn.compact
  def __call__(self, images, train: bool = False, return_blocks: bool = False):
    for field, valid in (("pooled", ("cls", "first_patch")), ("tokens", ("normed", "prenorm"))):
      if getattr(self, field) not in valid:
        raise ValueError(f"unknown {field} {getattr(self, field)!r}; valid: {valid}")
    dtype = jnp.dtype(self.dtype)
    b = images.shape[0]
    x = layers.patch_embed(images, self.width, self.patch_size, dtype, self.patch_bias)
    grid = x.shape[1:3]
    x = x.reshape(b, -1, self.width)

    gh, gw = self.native_grid
    init = nn.initializers.truncated_normal(0.02)
    pos = self.param("pos_embed", init, (1, 1 + gh * gw, self.width))
    pos_patches = posemb.resample_grid(pos[0, 1:].reshape(gh, gw, self.width), grid, self.posemb)
    cls = self.param("cls_token", init, (1, 1, self.width)) + pos[:, :1]
    x = x.astype(layers.STREAM) + pos_patches.reshape(1, -1, self.width)
    prefix = [jnp.broadcast_to(cls, (b, 1, self.width)).astype(layers.STREAM)]
    if self.num_registers:
      regs = self.param("reg_tokens", init, (1, self.num_registers, self.width))
      prefix.append(jnp.broadcast_to(regs, (b, self.num_registers, self.width)).astype(layers.STREAM))
    x = jnp.concatenate(prefix + [x], axis=1)
    if self.pre_norm:
      x = layers.LayerNorm(epsilon=self.ln_eps, dtype=layers.STREAM, name="norm_pre")(x)

    depth = self.depth if self.num_blocks is None else self.num_blocks
    fields = dict(heads=self.heads, mlp_hidden=self.mlp_hidden, mlp_act=self.mlp_act, qkv_bias=self.qkv_bias,
                  ln_eps=self.ln_eps, layerscale=self.layerscale, dtype=dtype, attn_impl=self.attn_impl,
                  attn_query_chunk=self.attn_query_chunk)
    if self.scan_blocks and not self.is_initializing() and not (train and self.drop_path):
      block = layers.Block(**fields, remat_attention=self.remat and self.remat_policy == "attention", parent=None)
      params = [self.variables["params"][f"blocks_{i}"] for i in range(depth)]
      x, blocks = layers.scan_blocks(block, params, x, self.remat, self.remat_policy, return_blocks)
    else:
      block_cls, extra = layers.block_class(self.remat, self.remat_policy)
      blocks = []
      for i in range(depth):
        x = block_cls(**fields, drop_path=self.drop_path * i / max(self.depth - 1, 1), **extra,
                      name=f"blocks_{i}")(x, train)
        if return_blocks:
          blocks.append(x.astype(jnp.float32))

    normed = layers.LayerNorm(epsilon=self.ln_eps, dtype=dtype, name="norm")(x)
    first_patch = 1 + self.num_registers
    pooled = normed[:, first_patch] if self.pooled == "first_patch" else normed[:, 0]
    if self.proj_dim:
      proj = self.param("proj", nn.initializers.normal(self.width ** -0.5), (self.width, self.proj_dim))
      pooled = pooled @ proj.astype(dtype)
    tokens = (normed if self.tokens == "normed" else x)[:, first_patch:]
    out = {"pooled": pooled.astype(jnp.float32), "tokens": tokens.astype(jnp.float32)}
    if return_blocks:
      out["blocks"] = blocks
    return out


def _vit(width, depth, heads, mlp_hidden=None, **kw):
  return dict(width=width, depth=depth, heads=heads, mlp_hidden=mlp_hidden or 4 * width, **kw)


_DINOV2 = dict(patch_size=14, native_resolution=(518, 518), layerscale=True, posemb="dino_offset",
               tokens="prenorm")
_DINOV2_SIZES = {
    "s": _vit(384, 12, 6, **_DINOV2),
    "b": _vit(768, 12, 12, **_DINOV2),
    "l": _vit(1024, 24, 16, **_DINOV2),
    "g": _vit(1536, 40, 24, mlp_hidden=4096, mlp_act="swiglu", **_DINOV2),
}

MODELS = {
    # ImageNet-1k supervised DeiT-B; the paper's DeiT resizes its posemb with sqrt(n_new / n_old).
    "deit_base_patch16": _vit(768, 12, 12, posemb="deit_sqrt"),
    "dino_vitb16": _vit(768, 12, 12, posemb="dino_offset"),
    "openclip_vitb16": _vit(768, 12, 12, ln_eps=1e-5, patch_bias=False, pre_norm=True, proj_dim=512,
                            tokens="prenorm"),
    "blip_vitb16": _vit(768, 12, 12, posemb="size"),
    **{f"dinov2_vit{s}14": cfg for s, cfg in _DINOV2_SIZES.items()},
    # The hub's `_reg` builders resize with interpolate_offset=0, interpolate_antialias=True, as HF does.
    **{f"dinov2_vit{s}14_reg4": dict(cfg, num_registers=4, posemb="size_antialias")
       for s, cfg in _DINOV2_SIZES.items()},
}


def at_resolution(module: Model, params: dict, resolution: tuple[int, int]) -> dict:
  """`params` with the position embedding resized once to the grid of `resolution`, by the same
  resampling the model applies at call time (the paper's OpenCLIP does it at load, through
  open_clip's `force_image_size`); use it with `native_resolution=resolution`."""
  gh, gw = module.native_grid
  grid = (resolution[0] // module.patch_size, resolution[1] // module.patch_size)
  pos = params["pos_embed"]
  patches = posemb.resample_grid(pos[0, 1:].reshape(gh, gw, module.width), grid, module.posemb)
  resized = jnp.concatenate([pos[:, :1], patches.reshape(1, -1, module.width).astype(pos.dtype)], axis=1)
  return {**params, "pos_embed": resized}
