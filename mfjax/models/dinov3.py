"""DINOv3 ViT (and MedDINOv3's backbone): axial RoPE, storage tokens, LayerScale, masked key bias.

Token order is [cls, storage tokens, patches]. There is no absolute position embedding: RoPE
rotates the patch tokens' queries and keys only, with coordinates computed from the input grid,
so any multiple of the patch size works without resampling anything.
  pooled  the final-normed CLS token (DINOv3's `x_norm_clstoken`, HF's `pooler_output`);
  tokens  the final-normed patch tokens ("normed") or the last block's output ("prenorm").
  intermediate  with `intermediate=(i, ...)`: those blocks' patch tokens (0-based block numbers),
          each through the final LayerNorm (DINOv3's get_intermediate_layers(norm=True)), the
          input of MedDINOv3's segmentation decoder.
`masks` (B, rows * cols) bool replaces those patch embeddings by `mask_token`, as in iBOT.

Training (`train=True`, 'dropout' rng): RoPE coordinates get DINOv3's shift / jitter / rescale
augmentation where the model sets them, drawn anew for every block as DINOv3's own code does
(HF and timm draw once per forward), and stochastic depth is DINOv3's: the same rate in every
block, a random subset of max(int(B (1 - p)), 1) samples keeps each residual branch, scaled by
B / subset.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mfjax.models import layers


def subset_drop_path(module: nn.Module, x, branch, rate: float, train: bool):
  """x + branch, where in training only a random subset of the batch adds its (rescaled) branch."""
  if not train or rate == 0.0:
    return x + branch
  b = x.shape[0]
  keep = max(int(b * (1.0 - rate)), 1)
  chosen = jax.random.permutation(module.make_rng("dropout"), b)[:keep]
  scale = jnp.zeros((b,), branch.dtype).at[chosen].set(b / keep)
  return x + branch * scale.reshape((b,) + (1,) * (x.ndim - 1))


class Block(nn.Module):
  """Pre-norm block: x + ls1(attn(norm1 x)) then x + ls2(mlp(norm2 x)), RoPE on q and k."""
  heads: int
  mlp_hidden: int
  mlp_act: str = "gelu"
  qkv_bias: bool = True
  k_bias: bool = False
  ln_eps: float = 1e-5
  drop_path: float = 0.0
  dtype: layers.Dtype = jnp.float32
  attn_impl: str | None = None
  attn_query_chunk: int = 0

  @nn.compact
  def __call__(self, x, train: bool, sin, cos):
    x = x.astype(layers.STREAM)
    rope = lambda t: layers.apply_rope(t, sin, cos)
    y = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm1")(x)
    y = layers.Attention(self.heads, self.qkv_bias, self.dtype, self.attn_impl, k_bias=self.k_bias,
                         query_chunk=self.attn_query_chunk, name="attn")(y, rope)
    x = subset_drop_path(self, x, layers.LayerScale(name="ls1")(y), self.drop_path, train)
    y = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm2")(x)
    y = layers.Mlp(self.mlp_hidden, self.mlp_act, self.dtype, name="mlp")(y)
    return subset_drop_path(self, x, layers.LayerScale(name="ls2")(y), self.drop_path, train)


class Model(nn.Module):
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_hidden: int = 3072
  mlp_act: str = "gelu"
  qkv_bias: bool = True
  k_bias: bool = False             # False: the key bias is masked to zero (DINOv3's mask_k_bias)
  ln_eps: float = 1e-5
  num_storage: int = 4
  rope_base: float = 100.0
  rope_normalize: str = "separate"  # separate | min | max (layers.ROPE_NORMALIZE)
  rope_shift: float | None = None   # train-time RoPE coordinate augmentation, off when None
  rope_jitter: float | None = None
  rope_rescale: float | None = None
  rope_dtype: str = "float32"       # bfloat16: the original code's training-default RoPE precision
  rope_periods: tuple | None = None # a checkpoint's stored periods (the hub code uses them); None: computed
  native_resolution: tuple[int, int] = (224, 224)  # bookkeeping only: RoPE has nothing to resample
  tokens: str = "normed"            # normed | prenorm
  num_blocks: int | None = None     # keep only the first k blocks (decapitation)
  drop_path: float = 0.0
  dtype: str = "float32"            # compute dtype; parameters stay float32
  attn_impl: str | None = None
  attn_query_chunk: int = 0         # > 0: attend this many queries at a time (memory at 1024 px)
  remat: bool = False
  intermediate: tuple[int, ...] = ()  # blocks whose final-normed patch tokens are returned

  def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of `tokens` for an input of `image_size`."""
    return (image_size[0] // self.patch_size, image_size[1] // self.patch_size)

  @property
  def rope_augmented(self) -> bool:
    """Whether training augments the RoPE coordinates (shift, jitter or rescale set)."""
    return any(v is not None for v in (self.rope_shift, self.rope_jitter, self.rope_rescale))

  def rope(self, grid: tuple[int, int], train: bool):
    """(sin, cos) of the patch grid, (rows * cols, head_dim) each in `rope_dtype`."""
    rope_dtype = jnp.dtype(self.rope_dtype)
    coords = layers.rope_coords(grid, self.rope_normalize, rope_dtype)
    if train and self.rope_augmented:
      coords = layers.augment_rope_coords(coords, self.make_rng("dropout"), self.rope_shift, self.rope_jitter,
                                          self.rope_rescale, rope_dtype)
    if self.rope_periods is None:
      periods = layers.rope_periods(self.width // self.heads, self.rope_base, rope_dtype)
    else:
      periods = jnp.asarray(self.rope_periods, jnp.float32).astype(rope_dtype).astype(jnp.float32)
    return layers.rope_sin_cos(coords, periods, rope_dtype)

  @nn.compact
  def __call__(self, images, train: bool = False, return_blocks: bool = False, masks=None):
    if self.tokens not in ("normed", "prenorm"):
      raise ValueError(f"unknown tokens {self.tokens!r}; valid: ('normed', 'prenorm')")
    dtype = jnp.dtype(self.dtype)
    b = images.shape[0]
    x = layers.patch_embed(images, self.width, self.patch_size, dtype)
    grid = x.shape[1:3]
    x = x.reshape(b, -1, self.width).astype(layers.STREAM)

    init = nn.initializers.normal(0.02)
    mask_token = self.param("mask_token", nn.initializers.zeros_init(), (1, self.width))
    if masks is not None:
      if masks.shape != x.shape[:2]:
        raise ValueError(f"masks has shape {masks.shape}; expected {x.shape[:2]} (batch, patches)")
      x = jnp.where(masks[..., None], mask_token, x)
    cls = self.param("cls_token", init, (1, 1, self.width))
    prefix = [jnp.broadcast_to(cls, (b, 1, self.width))]
    if self.num_storage:  # DINOv3 creates no parameter without storage tokens (and orbax saves no empty array)
      storage = self.param("storage_tokens", init, (1, self.num_storage, self.width))
      prefix.append(jnp.broadcast_to(storage, (b, self.num_storage, self.width)))
    x = jnp.concatenate([*prefix, x], axis=1)

    # DINOv3 draws augmented RoPE coordinates anew for every block (its forward calls rope_embed in the
    # block loop); HF and timm draw once per forward.
    augmented = train and self.rope_augmented
    sin, cos = self.rope(grid, train)
    depth = self.depth if self.num_blocks is None else self.num_blocks
    bad = [i for i in self.intermediate if not 0 <= i < depth]
    if bad:
      raise ValueError(f"intermediate blocks {bad} do not exist: the model has blocks 0..{depth - 1}")
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    blocks, taken = [], []
    for i in range(depth):
      if augmented and i:
        sin, cos = self.rope(grid, train)
      x = block_cls(self.heads, self.mlp_hidden, self.mlp_act, self.qkv_bias, self.k_bias, self.ln_eps,
                    self.drop_path, dtype, self.attn_impl, self.attn_query_chunk, name=f"blocks_{i}")(x, train, sin, cos)
      if return_blocks:
        blocks.append(x.astype(jnp.float32))
      if i in self.intermediate:
        taken.append(x)

    norm = layers.LayerNorm(epsilon=self.ln_eps, dtype=dtype, name="norm")
    normed = norm(x)
    first_patch = 1 + self.num_storage
    tokens = (normed if self.tokens == "normed" else x)[:, first_patch:]
    out = {"pooled": normed[:, 0].astype(jnp.float32), "tokens": tokens.astype(jnp.float32)}
    if return_blocks:
      out["blocks"] = blocks
    if self.intermediate:
      out["intermediate"] = [norm(t[:, first_patch:]) for t in taken]
    return out


def _dinov3(width, depth, heads, **kw):
  # The hub builders train with RoPE rescale 2 (HF's DINOv3ViTConfig.pos_embed_rescale default).
  return dict(width=width, depth=depth, heads=heads, mlp_hidden=4 * width, rope_rescale=2.0, **kw)


MODELS = {
    "dinov3_vits16": _dinov3(384, 12, 6),
    "dinov3_vitb16": _dinov3(768, 12, 12),
    "dinov3_vitl16": _dinov3(1024, 24, 16),
    # MedDINOv3's released backbone: vit_base(qkv_bias=False, n_storage_tokens=4), 'layernorm' eps
    # 1e-6, no RoPE augmentation.
    "meddinov3_vitb16": dict(width=768, depth=12, heads=12, mlp_hidden=3072, qkv_bias=False, ln_eps=1e-6),
}
