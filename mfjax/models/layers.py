"""Building blocks shared by the transformer families."""
import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mfjax import cpu_gemm

Dtype = Any


def in_float32(fn: Callable) -> Callable:
  """`fn` (elementwise) computed in float32 and returned in its input's dtype. XLA:CPU has no
  bf16 vector arithmetic and converts around each op of a bf16 chain; in float32 the chain is
  one loop (bf16 erf GELU forward + backward at ViT-B's fc1 size: 7.9 -> 3.2 ms on Zen 4), and
  it rounds once instead of at every op, as torch's bf16 CPU kernels do."""
  @functools.wraps(fn)
  def computed_in_float32(x):
    return fn(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(x.dtype)
  return computed_in_float32


class LayerNorm(nn.LayerNorm):
  """nn.LayerNorm whose statistics hold where the mean dwarfs the spread, as torch's do: flax's
  one-pass variance E[x^2] - E[x]^2 cancels there (about 370 off for a mean of 300 and a spread of
  0.1). Each row is shifted by its first element first (in float32), which leaves the norm
  unchanged and the one pass exact enough; its two-pass variance costs 5% of a ViT-B CPU step."""

  def __call__(self, x, *args, **kwargs):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return super().__call__(x - jax.lax.stop_gradient(x[..., :1]), *args, **kwargs)


@in_float32
def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


@in_float32
def gelu(x):
  """Exact GELU as torch computes it, x/2 (1 + erf(x/sqrt 2)); on CPU the erf polynomial is
  cheaper than the erfc form of jax.nn.gelu (`gelu_erfc`, more accurate far below zero)."""
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu,
    "gelu_erfc": in_float32(lambda x: nn.gelu(x, approximate=False)),
    "gelu_tanh": in_float32(lambda x: nn.gelu(x, approximate=True)),
    "quick_gelu": quick_gelu,
    "silu": in_float32(nn.silu),
    "relu": nn.relu,
}


def _rows_first(a):
  """`a.T` (2-D) written out row-major. XLA folds a plain transpose into the consuming dot's
  layout, and XLA:CPU's bf16 GEMM (YNNPACK) takes only row-major operands: with the folded
  transpose it upcasts both operands and runs the float32 GEMM instead."""
  m, k = a.shape
  return jnp.transpose(a.reshape(m, k, 1), (1, 0, 2)).reshape(k, m)


def bf16_gemm_forward(x, w):
  """x @ w for 2-D bf16 operands, float32-accumulated: the bf16 Dense's forward GEMM."""
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def bf16_gemm_grad_input(grad, w):
  """grad @ w.T, float32-accumulated: the bf16 Dense's input-gradient GEMM."""
  return jax.lax.dot_general(grad, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(grad.dtype)


def bf16_gemm_grad_weight(x, grad):
  """x.T @ grad on a row-major copy of x.T, float32-accumulated: the bf16 Dense's weight-gradient GEMM."""
  return jnp.dot(_rows_first(x), grad, preferred_element_type=jnp.float32).astype(grad.dtype)


@jax.custom_vjp
def _bf16_matmul(x, w):
  return bf16_gemm_forward(x, w)


def _bf16_matmul_fwd(x, w):
  return bf16_gemm_forward(x, w), (x, w)


def _bf16_matmul_bwd(residuals, grad):
  x, w = residuals
  return bf16_gemm_grad_input(grad, w), bf16_gemm_grad_weight(x, grad)  # all bf16: see dense_dot_general


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's `dot_general`: lax.dot_general, except on CPU: in float32 MKL's GEMMs where
  `cpu_gemm.enabled_for` says so; in bf16 each GEMM of the layer (forward, input and weight
  gradient) runs bf16 x bf16 with float32 accumulation on row-major operands, the only form
  XLA:CPU sends to its bf16 kernel (about twice its float32 GEMM rate on AVX512-BF16; the default
  lowering runs bf16 dots below the float32 rate)."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  plain_matmul = (batch == ((), ()) and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
                  and rhs.ndim == 2 and lhs.size > 0)
  if plain_matmul and preferred_element_type in (None, jnp.float32) and cpu_gemm.enabled_for(lhs, rhs):
    matmul = cpu_gemm.matmul
  elif (plain_matmul and jax.default_backend() == "cpu" and lhs.dtype == rhs.dtype == jnp.bfloat16
        and preferred_element_type in (None, jnp.bfloat16)):
    matmul = _bf16_matmul
  else:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  out = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
  # Named, so that remat_policy=dots keeps it as it keeps an XLA dot (it cannot see into a custom call).
  return checkpoint_name(out, DENSE_OUT).reshape(*lhs.shape[:-1], rhs.shape[1])


DENSE_OUT = "mfjax_dense_out"
# remat_policy=dots: XLA's matmul outputs, and those of MKL's custom call on the CPU, which the dots
# policy cannot see (named in dense_dot_general).
DOTS_SAVEABLE = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, jax.checkpoint_policies.save_only_these_names(DENSE_OUT))


def Dense(features: int, **kwargs) -> nn.Dense:  # pylint: disable=invalid-name
  """nn.Dense whose matmuls go through `dense_dot_general`: the same parameters; in float32 the
  same computation, in bf16 on CPU float32-accumulated GEMMs."""
  return nn.Dense(features, dot_general=dense_dot_general, **kwargs)


def dense(layer: nn.Dense, x):
  """`layer(x)` on `x` flattened to (rows, features): XLA:CPU then runs the backward matmuls
  without transposing copies of the activations (5% faster ViT-B step on CPU; same result)."""
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], layer.features)


def check_images(images) -> None:
  """A plain error for input that is not a batch of NHWC images (PyTorch's NCHW is the usual slip)."""
  shape = tuple(getattr(images, "shape", ()))
  if len(shape) != 4:
    raise ValueError(f"expected NHWC images (batch, height, width, channels), got shape {shape}")
  if shape[1] in (1, 3) and shape[3] > 4:
    raise ValueError(f"images of shape {shape} look like PyTorch's NCHW; mfjax models take NHWC (batch, height, "
                     "width, channels): x.transpose(0, 2, 3, 1)")


def patch_embed(images, width: int, patch_size: int, dtype, use_bias: bool = True):
  """The non-overlapping patch projection, a strided conv named `patch_embed` in the calling
  module: (B, H, W, C) -> (B, H/p, W/p, width). H and W must be multiples of the patch size."""
  check_images(images)
  h, w = images.shape[1:3]
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
  return nn.Conv(width, (patch_size,) * 2, strides=(patch_size,) * 2, padding="VALID", use_bias=use_bias,
                 dtype=dtype, name="patch_embed")(images.astype(dtype))


class Mlp(nn.Module):
  """fc1 -> activation -> fc2. `act="swiglu"` packs both SwiGLU inputs into fc1."""
  hidden: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_dim = x.shape[-1]
    if self.act != "swiglu" and self.act not in ACTIVATIONS:
      raise ValueError(f"unknown mlp_act {self.act!r}; valid: swiglu, {', '.join(ACTIVATIONS)}")
    if self.act == "swiglu":
      h = dense(Dense(2 * self.hidden, dtype=self.dtype, name="fc1"), x)
      gate, value = jnp.split(h, 2, axis=-1)
      h = ACTIVATIONS["silu"](gate) * value
    else:
      h = ACTIVATIONS[self.act](dense(Dense(self.hidden, dtype=self.dtype, name="fc1"), x))
    return dense(Dense(out_dim, dtype=self.dtype, name="fc2"), h)


ATTENTION_IMPLS = (None, "xla", "cudnn", "softmax")


ATTENTION_VALUES = "attention_values"


def recompute_attention(attend: Callable) -> Callable:
  """`attend` under jax.checkpoint: its (B, H, N, N) weights are recomputed in the backward pass.
  The softmax core's unnormalised values (B, H, N, D) are kept, so the recomputation leaves out
  their weights @ v matmul (the backward needs them only for the normaliser's gradient)."""
  return jax.checkpoint(attend, policy=jax.checkpoint_policies.save_only_these_names(ATTENTION_VALUES))


class DecomposedBias(NamedTuple):
  """An attention bias that is a sum over a grid of keys: bias[..., h, q, key] = rows[..., h, q,
  key // columns] + cols[..., h, q, key % columns] (SAM's decomposed relative positions). The
  fused CPU core takes the two tables; every other core gets `dense()`."""
  rows: jax.Array  # (..., heads, N_q, key rows)
  cols: jax.Array  # (..., heads, N_q, key columns)

  def dense(self):
    return (self.rows[..., :, None] + self.cols[..., None, :]).reshape(*self.rows.shape[:-1], -1)


def dense_bias(attend: Callable) -> Callable:
  """`attend` (a core that takes a dense bias) accepting a DecomposedBias too."""
  def attend_dense(q, k, v, bias=None):
    return attend(q, k, v, bias=bias.dense() if isinstance(bias, DecomposedBias) else bias)
  return attend_dense


# Keys above which the softmax core runs fused on CPU. At 197 tokens (ViT-B at 224) the fused core
# alone is faster, but the whole train step measured 0.98-0.995x with it (in-process A/B, Intel
# Xeon, 2026-12-06); at 1370 and 4096 tokens it is 1.4-1.5x faster and holds no (N, N) weights.
FUSED_MIN_KEYS = 256


def softmax_attention(q, k, v, bias=None):
  """softmax(q k^T / sqrt(D) + bias) v on (B, N, H, D) inputs, computed head-major with the logits
  in float32 and the normalisation applied after the product with v: one pass fewer over the
  (B, H, N, N) weights than softmax-then-matmul. The fastest form on CPU; its two batched
  matmuls run in MKL where `cpu_gemm.enabled_for` says so, and without a bias or with a
  DecomposedBias, beyond FUSED_MIN_KEYS keys, the whole core runs as MKL's fused attention
  (`cpu_gemm.attention`: no (N, N) weights in memory). A dense `bias` broadcasts against the (B,
  H, N, N) logits."""
  tables = tuple(bias) if isinstance(bias, DecomposedBias) else ()
  fusable = (bias is None or tables) and k.shape[1] > FUSED_MIN_KEYS
  if fusable and cpu_gemm.fused_attention_enabled_for(q, k, v, *tables):
    return cpu_gemm.attention(q, k, v, q.shape[-1] ** -0.5, *tables)
  if tables:
    bias = bias.dense()
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  mkl = cpu_gemm.enabled_for(q, k, v)
  if mkl:
    logits = cpu_gemm.matmul(q, k, transpose_b=True)
  else:
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  if mkl:
    out = cpu_gemm.matmul(weights, v)
  else:
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = checkpoint_name(out, ATTENTION_VALUES) / weights.sum(axis=-1, keepdims=True)
  return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def attention_fn(impl: str | None, query_chunk: int = 0) -> Callable:
  """The attention core for `attn_impl`: None picks `softmax` on CPU and lets
  jax.nn.dot_product_attention choose elsewhere (in jax 0.10 that is always its XLA
  implementation, not cuDNN's fused kernel); 'xla'/'cudnn' force that implementation. `query_chunk` > 0
  attends that many queries at a time (see `chunk_queries`)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attn_impl {impl!r}; valid: {', '.join(map(str, ATTENTION_IMPLS))}")
  if query_chunk < 0:
    raise ValueError(f"attn_query_chunk must be >= 0 (0: all queries at once), got {query_chunk}")
  if impl == "softmax" or (impl is None and jax.default_backend() == "cpu"):
    attend = softmax_attention
  else:
    attend = dense_bias(functools.partial(jax.nn.dot_product_attention, implementation=impl))
  return chunk_queries(attend, query_chunk) if query_chunk else attend


def chunk_queries(attend: Callable, chunk: int) -> Callable:
  """`attend(q, k, v)` on (B, N, H, D) inputs, `chunk` queries at a time against all N keys, each
  chunk recomputed in the backward pass: the (B, H, chunk, N) weights live one chunk at a time
  instead of (B, H, N, N) for the whole block (6.4 GB at 4096 tokens, batch 8). The queries
  are zero-padded to a multiple of `chunk`; the padded rows are dropped."""
  def chunked(q, k, v):
    b, n = q.shape[:2]
    if n <= chunk:
      return attend(q, k, v)
    q = jnp.pad(q, ((0, 0), (0, -n % chunk), (0, 0), (0, 0)))
    q_chunks = q.reshape(b, -1, chunk, *q.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda q_chunk: recompute_attention(attend)(q_chunk, k, v), q_chunks)
    return out.swapaxes(0, 1).reshape(b, -1, *out.shape[3:])[:, :n]
  return chunked


class MaskedKeyBiasDense(nn.Module):
  """The fused [q; k; v] projection with the key third of its bias held at exactly zero.

  DINOv3's `LinearKMaskedBias`: the parameters are those of nn.Dense (kernel (D, 3D), bias (3D,)),
  and the bias is multiplied by [1, 0, 1] per third in the forward pass, so whatever the stored
  key bias holds it never reaches the output and never gets a gradient.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    third = self.features // 3
    mask = np.concatenate([np.ones(third), np.zeros(third), np.ones(third)]).astype(np.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias * mask, dtype=self.dtype)
    return dense_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection ([q; k; v], heads major).

  `k_bias=False` (with `qkv_bias=True`) keeps the key bias at zero: DINOv3's masked key bias.
  """
  heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  attn_impl: str | None = None  # see attention_fn
  remat_core: bool = False      # recompute the (heads, N, N) attention weights in the backward pass
  k_bias: bool = True
  query_chunk: int = 0          # > 0: attend this many queries at a time (see chunk_queries)

  @nn.compact
  def __call__(self, x, rope: Callable | None = None):
    b, n, d = x.shape
    if self.qkv_bias and not self.k_bias:
      qkv = dense(MaskedKeyBiasDense(3 * d, self.dtype, name="qkv"), x)
    else:
      qkv = dense(Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv"), x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.heads, d // self.heads), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    if rope is not None:
      q, k = rope(q), rope(k)
    attend = attention_fn(self.attn_impl, self.query_chunk)
    out = (recompute_attention(attend) if self.remat_core else attend)(q, k, v)
    return dense(Dense(d, dtype=self.dtype, name="proj"), out.reshape(b, n, d))


# The residual stream's dtype whatever the compute dtype, as under torch's autocast: its float32
# position embeddings, LayerScale gammas and LayerNorm outputs make every residual sum float32 there.
# In bfloat16 the small LayerScaled updates of deep models would round away against the stream.
STREAM = jnp.float32


class LayerScale(nn.Module):
  """x * gamma, in float32 (the residual stream's dtype)."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x.astype(STREAM) * gamma


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (needs the 'dropout' rng)."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""
  heads: int
  mlp_hidden: int
  mlp_act: str = "gelu"
  qkv_bias: bool = True
  ln_eps: float = 1e-6
  layerscale: bool = False
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attn_impl: str | None = None
  remat_attention: bool = False
  attn_query_chunk: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False, rope: Callable | None = None):
    x = x.astype(STREAM)
    norm = lambda name: LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    scale = (lambda name: LayerScale(name=name)) if self.layerscale else (lambda name: (lambda y: y))
    y = Attention(self.heads, self.qkv_bias, self.dtype, self.attn_impl, self.remat_attention,
                  query_chunk=self.attn_query_chunk, name="attn")(norm("norm1")(x), rope)
    x = x + DropPath(self.drop_path)(scale("ls1")(y), train)
    y = Mlp(self.mlp_hidden, self.mlp_act, self.dtype, name="mlp")(norm("norm2")(x))
    return x + DropPath(self.drop_path)(scale("ls2")(y), train)


# What a rematerialised ("remat") block keeps for the backward pass; the rest is recomputed.
#   block      only the block's input: the whole block runs again (least memory)
#   dots       the outputs of the weight matmuls too; norms, GELU and attention run again
#   attention  everything except the (heads, N, N) attention weights, recomputed from q and k:
#              the activations that grow with N^2 and dominate at 1024 px
REMAT_POLICIES = ("block", "dots", "attention")


def block_class(remat: bool, policy: str = "block") -> tuple[type, dict]:
  """(module class, extra Block fields) for a transformer block with or without remat."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; valid: {', '.join(REMAT_POLICIES)}")
  if not remat:
    return Block, {}
  if policy == "attention":
    return Block, {"remat_attention": True}
  return nn.remat(Block, static_argnums=(2,), policy=DOTS_SAVEABLE if policy == "dots" else None), {}


def scan_blocks(block: Block, block_params: list[dict], x, remat: bool, policy: str, collect: bool):
  """Run identical blocks with `lax.scan` over their stacked parameters: XLA compiles one block
  instead of `len(block_params)`. `block` is an unbound Block (no drop-path: every block runs
  the same function). Returns (output, [each block's output as float32] if `collect`)."""
  stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *block_params)

  def body(x, params):
    y = block.apply({"params": params}, x)
    return y, (y.astype(jnp.float32) if collect else None)

  if remat and policy != "attention":
    body = jax.checkpoint(body, policy=DOTS_SAVEABLE if policy == "dots" else None)
  x, ys = jax.lax.scan(body, x, stacked)
  return x, (list(ys) if collect else [])


# ------------------------------------------------------------------- axial RoPE (DINOv3)
#
# DINOv3 rotates each head's (q, k) of the patch tokens by angles 2 pi (y, x) / period, with
# patch-centre coordinates (y, x) in [-1, 1] and periods base ** (2i / (head_dim / 2)).
# The angle layout is [y periods, x periods] tiled twice, rotated "by halves" (not interleaved).
# Every step is computed in float32 and rounded to the RoPE dtype, as PyTorch does on bfloat16
# tensors, so dtype=bfloat16 follows the original code's bfloat16 RoPE step by step.

ROPE_NORMALIZE = ("separate", "min", "max")


def _rounded(x, dtype):
  return x.astype(dtype).astype(jnp.float32)


def rope_periods(head_dim: int, base: float, dtype=jnp.float32):
  """(head_dim // 4,) periods base ** (2 i / (head_dim // 2)), rounded to `dtype`."""
  if head_dim % 4:
    raise ValueError(f"axial RoPE needs a head dimension divisible by 4, got {head_dim}")
  exponents = (2 * np.arange(head_dim // 4, dtype=np.float32)) / np.float32(head_dim // 2)
  return _rounded(jnp.float32(base) ** _rounded(jnp.asarray(exponents), dtype), dtype)


def rope_coords(grid: tuple[int, int], normalize: str = "separate", dtype=jnp.float32):
  """(rows * cols, 2) patch-centre coordinates (y, x) in [-1, 1], row-major over the grid.

  normalize: 'separate' divides each axis by its own length, 'min'/'max' both by the shorter/longer.
  """
  h, w = grid
  if normalize not in ROPE_NORMALIZE:
    raise ValueError(f"unknown RoPE coordinate normalization {normalize!r}; valid: {ROPE_NORMALIZE}")
  denom = {"separate": (h, w), "min": (min(h, w),) * 2, "max": (max(h, w),) * 2}[normalize]
  axes = [_rounded(_rounded(jnp.arange(0.5, n, dtype=jnp.float32), dtype) / d, dtype)
          for n, d in zip((h, w), denom)]
  coords = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1).reshape(h * w, 2)
  return _rounded(_rounded(2.0 * coords, dtype) - 1.0, dtype)


def augment_rope_coords(coords, rng, shift: float | None = None, jitter: float | None = None,
                        rescale: float | None = None, dtype=jnp.float32):
  """DINOv3's train-time coordinate augmentation, in its order (each factor drawn per call).

  shift: + U(-shift, shift) per axis; jitter: * exp(U(-ln jitter, ln jitter)) per axis;
  rescale: * exp(U(-ln rescale, ln rescale)), one factor for both axes.
  """
  shift_rng, jitter_rng, rescale_rng = jax.random.split(rng, 3)
  if shift is not None:
    coords = _rounded(coords + _rounded(jax.random.uniform(shift_rng, (2,), minval=-shift, maxval=shift), dtype),
                      dtype)
  if jitter is not None:
    log_j = math.log(jitter)
    factor = _rounded(jnp.exp(_rounded(jax.random.uniform(jitter_rng, (2,), minval=-log_j, maxval=log_j),
                                       dtype)), dtype)
    coords = _rounded(coords * factor, dtype)
  if rescale is not None:
    log_r = math.log(rescale)
    factor = _rounded(jnp.exp(_rounded(jax.random.uniform(rescale_rng, (), minval=-log_r, maxval=log_r),
                                       dtype)), dtype)
    coords = _rounded(coords * factor, dtype)
  return coords


def rope_sin_cos(coords, periods, dtype=jnp.float32):
  """(sin, cos), each (n, 4 * len(periods)) in `dtype`, for coordinates (n, 2)."""
  angles = _rounded(jnp.float32(2 * math.pi) * coords, dtype)[:, :, None]
  angles = _rounded(angles / periods, dtype).reshape(coords.shape[0], -1)  # [y periods, x periods]
  angles = jnp.tile(angles, 2)
  return jnp.sin(angles).astype(dtype), jnp.cos(angles).astype(dtype)


def apply_rope(x, sin, cos):
  """Rotate the last `len(sin)` tokens of x (B, N, heads, head_dim); leading tokens pass unrotated.

  x is cast to the RoPE dtype for the rotation and back, as DINOv3 does (for bfloat16 RoPE this
  rounds the unrotated prefix tokens too).
  """
  out_dtype = x.dtype
  x = x.astype(sin.dtype)
  prefix = x.shape[1] - sin.shape[0]
  patches = x[:, prefix:]
  first, second = jnp.split(patches, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  patches = patches * cos[:, None] + rotated * sin[:, None]
  return jnp.concatenate([x[:, :prefix], patches], axis=1).astype(out_dtype)
