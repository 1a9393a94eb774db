"""SAM's image encoder (ViTDet): windowed and global attention with decomposed relative positions.

What the benchmark uses (its `SAMWrapper`): the last block's output, with no final norm and no
neck. `pooled` is its mean over the token grid, `tokens` the grid flattened row-major; the neck
(1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d), SAM's image embedding, comes with
`return_neck=True`. SAM normalizes nothing itself: images arrive already normalized.

At a resolution other than the native 1024 the stored tables are resampled at call time:
  pos_embed             bicubic with antialias to the token grid (the paper's load-time resize);
  rel_pos_h/w (global)  `rel_pos_resize="nearest"`: F.interpolate's default 'nearest' to 2 * grid - 1,
                        as the paper's `filter_interpolate_weights` does at load time;
                        `"linear"`: segment_anything's own runtime `get_rel_pos` interpolation.
Windowed blocks always attend within 14 x 14 windows (the grid zero-padded to a multiple of 14
after norm1, padded tokens attended to like any other, as in segment_anything), so their
27-entry tables never change.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mfjax.models import layers, posemb

REL_POS_RESIZE = ("nearest", "linear")


def window_partition(x, window: int):
  """(B, H, W, C) -> (B * windows, window, window, C), zero-padding H and W up to multiples of window."""
  b, h, w, c = x.shape
  pad_h, pad_w = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c)


def window_unpartition(windows, window: int, size: tuple[int, int]):
  """Inverse of `window_partition`: (B * windows, window, window, C) -> (B, H, W, C), padding dropped."""
  h, w = size
  hp, wp = h + (-h % window), w + (-w % window)
  c = windows.shape[-1]
  x = windows.reshape(-1, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, hp, wp, c)[:, :h, :w]


def table_for(table, size: int, resize: str):
  """A relative-position table for `size` positions: its length 2 * size - 1, resized to that
  length if it is not (`resize` as in REL_POS_RESIZE)."""
  length = 2 * size - 1
  if table.shape[0] == length:
    return table
  if resize == "nearest":
    return posemb.resample_rel_pos_nearest(table, length)
  if resize == "linear":
    return posemb.resample_rel_pos_linear(table, length)
  raise ValueError(f"unknown rel_pos_resize {resize!r}; valid: {REL_POS_RESIZE}")


def relative_embeddings(table, size: int, resize: str):
  """(size, size, C) embeddings R[i, j] = table[i - j + size - 1] of one axis (`table_for` first)."""
  index = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return table_for(table, size, resize)[index]


class RelPosAttention(nn.Module):
  """Multi-head attention over a (B, H, W, D) grid with decomposed relative-position bias.

  logits[(i, j), (k, l)] = q.k / sqrt(d) + q . R_h[i, k] + q . R_w[j, l]   (MViTv2, as in SAM)
  """
  heads: int
  table_grid: tuple[int, int]  # the grid its stored tables were trained for: (2 g - 1, head_dim)
  rel_pos_resize: str = "nearest"
  dtype: layers.Dtype = jnp.float32
  attn_impl: str | None = None
  query_chunk_rows: int = 0    # > 0: attend this many grid rows of queries at a time (see Model)

  @nn.compact
  def __call__(self, x):
    b, h, w, d = x.shape
    head_dim = d // self.heads
    qkv = layers.dense(layers.Dense(3 * d, dtype=self.dtype, name="qkv"), x).reshape(b, h * w, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    table_h = self.param("rel_pos_h", nn.initializers.zeros_init(), (2 * self.table_grid[0] - 1, head_dim))
    table_w = self.param("rel_pos_w", nn.initializers.zeros_init(), (2 * self.table_grid[1] - 1, head_dim))
    rel_h = relative_embeddings(table_h, h, self.rel_pos_resize).astype(self.dtype)
    rel_w = relative_embeddings(table_w, w, self.rel_pos_resize).astype(self.dtype)

    core = layers.attention_fn(self.attn_impl)

    def attend(grid_q, rel_h_rows):
      """Queries of `r` grid rows (B, r, W, heads, C) against every key; rel_h_rows: (r, H, C)."""
      r = grid_q.shape[1]
      bias_h = jnp.einsum("brwnc,rkc->bnrwk", grid_q, rel_h_rows)
      bias_w = jnp.einsum("brwnc,wkc->bnrwk", grid_q, rel_w)
      bias = layers.DecomposedBias(bias_h.reshape(b, self.heads, r * w, h), bias_w.reshape(b, self.heads, r * w, w))
      return core(grid_q.reshape(b, r * w, self.heads, head_dim), k, v, bias=bias)

    grid_q = q.reshape(b, h, w, self.heads, head_dim)
    rows = chunk_rows(h, self.query_chunk_rows)
    if rows == h:
      out = attend(grid_q, rel_h)
    else:
      # One chunk of query rows at a time, each recomputed in the backward pass: the (heads, N, N)
      # logits, bias and probabilities never exist whole, only (heads, rows * W, N) of them.
      chunks = h // rows
      q_chunks = grid_q.reshape(b, chunks, rows, w, self.heads, head_dim).swapaxes(0, 1)
      out = jax.lax.map(lambda c: layers.recompute_attention(attend)(*c),
                        (q_chunks, rel_h.reshape(chunks, rows, h, head_dim)))
      out = out.swapaxes(0, 1).reshape(b, h * w, self.heads, head_dim)
    return layers.dense(layers.Dense(d, dtype=self.dtype, name="proj"), out.reshape(b, h, w, d))


def chunk_rows(h: int, requested: int) -> int:
  """The largest divisor of `h` not above `requested` (all of `h` when `requested` is 0)."""
  if requested <= 0 or requested >= h:
    return h
  return max(r for r in range(1, requested + 1) if h % r == 0)


class Block(nn.Module):
  """x + attn(norm1 x) (windowed when window > 0), then x + mlp(norm2 x); x is (B, H, W, D)."""
  heads: int
  mlp_hidden: int
  window: int               # 0: global attention over the whole grid
  table_grid: tuple[int, int]
  rel_pos_resize: str = "nearest"
  ln_eps: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  attn_impl: str | None = None
  query_chunk_rows: int = 0

  @nn.compact
  def __call__(self, x):
    x = x.astype(layers.STREAM)
    size = x.shape[1:3]
    y = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm1")(x)
    if self.window:
      y = window_partition(y, self.window)
    y = RelPosAttention(self.heads, self.table_grid, self.rel_pos_resize, self.dtype, self.attn_impl,
                        0 if self.window else self.query_chunk_rows, name="attn")(y)
    if self.window:
      y = window_unpartition(y, self.window, size)
    x = x + y
    y = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm2")(x)
    return x + layers.Mlp(self.mlp_hidden, "gelu", self.dtype, name="mlp")(y)


class Neck(nn.Module):
  """1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d, no biases on the convs (NHWC)."""
  features: int = 256
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="conv1")(x)
    x = layers.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                name="conv2")(x)
    return layers.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)


class Model(nn.Module):
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_hidden: int = 3072
  window: int = 14
  global_blocks: tuple[int, ...] = (2, 5, 8, 11)
  neck_features: int = 256
  ln_eps: float = 1e-6
  native_resolution: tuple[int, int] = (1024, 1024)
  posemb: str = "size_antialias"   # see posemb.POSEMB_METHODS
  rel_pos_resize: str = "nearest"  # nearest (the paper) | linear (segment_anything's get_rel_pos)
  num_blocks: int | None = None    # keep only the first k blocks (decapitation)
  dtype: str = "float32"           # compute dtype; parameters stay float32
  attn_impl: str | None = None     # the attention core: see layers.attention_fn
  remat: bool = False
  # Global blocks attend this many rows of the token grid's queries at a time (0: all at once):
  # at 1024 px the (heads, 4096, 4096) logits, bias and probabilities otherwise dominate memory.
  global_query_chunk_rows: int = 0

  @property
  def native_grid(self) -> tuple[int, int]:
    return (self.native_resolution[0] // self.patch_size, self.native_resolution[1] // self.patch_size)

  def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of `tokens` for an input of `image_size`."""
    return (image_size[0] // self.patch_size, image_size[1] // self.patch_size)

  @nn.compact
  def __call__(self, images, train: bool = False, return_blocks: bool = False, return_neck: bool = False):
    """`train` changes nothing: SAM's encoder has no dropout or stochastic depth."""
    del train
    if self.rel_pos_resize not in REL_POS_RESIZE:
      raise ValueError(f"unknown rel_pos_resize {self.rel_pos_resize!r}; valid: {REL_POS_RESIZE}")
    dtype = jnp.dtype(self.dtype)
    b = images.shape[0]
    x = layers.patch_embed(images, self.width, self.patch_size, dtype)
    grid = x.shape[1:3]
    pos = self.param("pos_embed", nn.initializers.zeros_init(), (1, *self.native_grid, self.width))
    x = x.astype(layers.STREAM) + posemb.resample_grid(pos[0], grid, self.posemb)[None]

    depth = self.depth if self.num_blocks is None else self.num_blocks
    block_cls = nn.remat(Block) if self.remat else Block
    window_grid = (self.window, self.window)
    blocks = []
    for i in range(depth):
      is_global = i in self.global_blocks
      x = block_cls(self.heads, self.mlp_hidden, 0 if is_global else self.window,
                    self.native_grid if is_global else window_grid, self.rel_pos_resize, self.ln_eps,
                    dtype, self.attn_impl, self.global_query_chunk_rows, name=f"blocks_{i}")(x)
      if return_blocks:
        blocks.append(x.reshape(b, -1, self.width).astype(jnp.float32))

    out = {"pooled": x.mean(axis=(1, 2)).astype(jnp.float32),
           "tokens": x.reshape(b, -1, self.width).astype(jnp.float32)}
    if return_blocks:
      out["blocks"] = blocks
    if return_neck or self.is_initializing():  # the neck's parameters always exist
      neck = Neck(self.neck_features, dtype, name="neck")(x)
      if return_neck:
        out["neck"] = neck.astype(jnp.float32)
    return out


def _sam(width, depth, heads, global_blocks):
  return dict(width=width, depth=depth, heads=heads, mlp_hidden=4 * width, global_blocks=global_blocks)


MODELS = {
    "sam_vitb": _sam(768, 12, 12, (2, 5, 8, 11)),
    "sam_vitl": _sam(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vith": _sam(1280, 32, 16, (7, 15, 23, 31)),
}


def at_resolution(module: Model, params: dict, resolution: tuple[int, int]) -> dict:
  """`params` with the position embedding and the global blocks' relative-position tables resized
  once to the grid of `resolution`, as the paper's `filter_interpolate_weights` does at load (the
  windowed blocks keep theirs), by the same resampling the model applies at call time; use it
  with `native_resolution=resolution`."""
  grid = (resolution[0] // module.patch_size, resolution[1] // module.patch_size)
  out = {**params, "pos_embed": posemb.resample_grid(params["pos_embed"][0], grid, module.posemb)[None]}
  for i in module.global_blocks:
    if f"blocks_{i}" not in params:
      continue
    attn = params[f"blocks_{i}"]["attn"]
    tables = {f"rel_pos_{axis}": table_for(attn[f"rel_pos_{axis}"], size, module.rel_pos_resize)
              for axis, size in (("h", grid[0]), ("w", grid[1]))}
    out[f"blocks_{i}"] = {**params[f"blocks_{i}"], "attn": {**attn, **tables}}
  return out
