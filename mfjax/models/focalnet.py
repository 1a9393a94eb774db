"""FocalNet: SEEM's FocalNet-T backbone (`focal_dw`) and timm's FocalNet classification family.

One Linen module; each released model is a set of constructor fields in `MODELS`.
SEEM's variant differs from timm's FocalNet in four ways, each a field here:
  dw_residual     depthwise 3x3 convs added residually before the modulation and the MLP
  norm_placement  "post_add": LayerNorm after the residual add, x = norm(x + ls(branch(x)))
                  (timm: "pre" or "post", the norm inside the branch)
  stem_conv       (kernel, stride, padding) = (7, 4, 3); timm's overlapped stem pads 2
  stage_norms     a LayerNorm on every stage output (timm: only after the last stage)
Parameters are named as in SEEM (`patch_embed`, `layers_{s}_blocks_{i}`, `layers_{s}_downsample`,
`norm{s}`). Downsampling sits at the end of stages 0..2, as in SEEM; timm puts the same conv at
the start of stages 1..3, which computes the same thing.

  pooled  spatial mean of the last stage's normed map (768-d for FocalNet-T).
  tokens  that map flattened, (B, rows*cols, C): 7x7 = 49 tokens at 224.
  blocks  each stage's output, after its output norm where the model has one, as
          (B, rows_s*cols_s, C_s) tokens: SEEM's res2..res5 (what decapitation cuts at).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mfjax.models import layers

NORM_PLACEMENTS = ("pre", "post", "post_add")


gelu = layers.ACTIVATIONS["gelu_erfc"]


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1



def _shifted_products(x, kernel):
  """out[b, y, x, c] = sum_ij pad(x)[b, y + i, x + j, c] * kernel[i, j, c]: one fused loop."""
  k, (rows, cols) = kernel.shape[0], x.shape[1:3]
  p = k // 2
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return sum(padded[:, i:i + rows, j:j + cols, :] * kernel[i, j] for i in range(k) for j in range(k))


@jax.custom_vjp
def depthwise_conv(x, kernel):
  """A same-padded, stride-1 depthwise convolution: x (B, H, W, C), kernel (k, k, C), k odd."""
  return _shifted_products(x, kernel)


def _depthwise_conv_forward(x, kernel):
  return _shifted_products(x, kernel), (x, kernel)


def _depthwise_conv_backward(saved, grad):
  # Written out because autodiff of the k*k shifted terms gives k*k separate pad-and-reduce
  # passes that XLA:CPU runs slowly and compiles for long; here the input gradient is the same
  # fused loop with the flipped kernel, the kernel gradient one small loop over the k*k offsets.
  x, kernel = saved
  k, (batch, rows, cols, channels) = kernel.shape[0], x.shape
  grad_x = _shifted_products(grad, kernel[::-1, ::-1])
  p = k // 2
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

  def offset_grad(offset):
    window = jax.lax.dynamic_slice(padded, (0, offset // k, offset % k, 0), (batch, rows, cols, channels))
    return jnp.sum(window * grad, axis=(0, 1, 2), dtype=jnp.float32)

  grad_kernel = jax.lax.map(offset_grad, jnp.arange(k * k)).reshape(k, k, channels)
  return grad_x, grad_kernel.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_conv_forward, _depthwise_conv_backward)


class DepthwiseConv(nn.Module):
  """A same-padded depthwise k x k convolution (nn.Conv with feature_group_count=C and its
  parameters: kernel (k, k, 1, C), bias (C,)), computed as a sum of k*k shifted products with a
  hand-written gradient. Same result; XLA:CPU's grouped convolution ran 6-15x slower forward and
  backward (its kernel gradient became a dense C x C convolution)."""
  kernel_size: int
  use_bias: bool = True
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    if k % 2 == 0:
      raise ValueError(f"DepthwiseConv: kernel_size {k} is even; 'same' padding needs an odd size")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,)) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    out = depthwise_conv(x, kernel[:, :, 0])
    return out + bias if bias is not None else out

class ConvEmbed(nn.Module):
  """The stem and the downsampling layers: strided conv, then LayerNorm over channels."""
  features: int
  conv: tuple[int, int, int]  # kernel, stride, padding
  ln_eps: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    k, s, p = self.conv
    x = nn.Conv(self.features, (k, k), (s, s), padding=((p, p), (p, p)), dtype=self.dtype,
                name="proj")(x)
    return layers.LayerNorm(epsilon=self.ln_eps, dtype=layers.STREAM, name="norm")(x)  # the stream's start


class FocalModulation(nn.Module):
  focal_level: int
  focal_window: int
  focal_factor: int = 2
  normalize_modulator: bool = False
  post_norm: bool = False
  ln_eps: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    levels = self.focal_level
    y = layers.Dense(2 * c + levels + 1, dtype=self.dtype, name="f")(x)
    q, ctx, gates = y[..., :c], y[..., c:2 * c], y[..., 2 * c:]
    ctx_all = 0.0
    for level in range(levels):
      k = self.focal_factor * level + self.focal_window
      ctx = gelu(DepthwiseConv(k, use_bias=False, dtype=self.dtype, name=f"focal_layers_{level}")(ctx))
      ctx_all = ctx_all + ctx * gates[..., level:level + 1]
    ctx_global = gelu(ctx.mean(axis=(1, 2), keepdims=True))
    ctx_all = ctx_all + ctx_global * gates[..., levels:]
    if self.normalize_modulator:
      ctx_all = ctx_all / (levels + 1)
    out = q * layers.Dense(c, dtype=self.dtype, name="h")(ctx_all)
    if self.post_norm:
      out = layers.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(out)
    return layers.Dense(c, dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
  focal_level: int
  focal_window: int
  mlp_ratio: float = 4.0
  norm_placement: str = "pre"
  dw_residual: bool = False
  layerscale: bool = False
  post_norm_in_modulation: bool = False
  normalize_modulator: bool = False
  drop_path: float = 0.0
  ln_eps: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(layers.STREAM)
    c = x.shape[-1]
    norm = lambda name, dtype=self.dtype: layers.LayerNorm(epsilon=self.ln_eps, dtype=dtype, name=name)
    scale = ((lambda name: layers.LayerScale(1e-4, name=name)) if self.layerscale
             else (lambda name: (lambda y: y)))
    depthwise = lambda name: DepthwiseConv(3, dtype=self.dtype, name=name)
    modulation = FocalModulation(self.focal_level, self.focal_window,
                                 normalize_modulator=self.normalize_modulator,
                                 post_norm=self.post_norm_in_modulation, ln_eps=self.ln_eps,
                                 dtype=self.dtype, name="modulation")
    mlp = layers.Mlp(int(c * self.mlp_ratio), "gelu", self.dtype, name="mlp")
    branches = (("1", modulation), ("2", mlp))
    for index, branch in branches:
      if self.dw_residual:
        x = x + depthwise(f"dw{index}")(x)
      drop = layers.DropPath(self.drop_path)
      if self.norm_placement == "pre":
        x = x + drop(scale(f"ls{index}")(branch(norm(f"norm{index}")(x))), train)
      elif self.norm_placement == "post":
        x = x + drop(scale(f"ls{index}")(norm(f"norm{index}")(branch(x))), train)
      else:
        x = norm(f"norm{index}", layers.STREAM)(x + drop(scale(f"ls{index}")(branch(x)), train))
    return x


class Model(nn.Module):
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  focal_levels: tuple[int, ...] = (2, 2, 2, 2)
  focal_windows: tuple[int, ...] = (3, 3, 3, 3)
  mlp_ratio: float = 4.0
  stem_conv: tuple[int, int, int] = (4, 4, 0)   # kernel, stride, padding
  down_conv: tuple[int, int, int] = (2, 2, 0)
  norm_placement: str = "pre"                    # see NORM_PLACEMENTS
  dw_residual: bool = False
  layerscale: bool = False
  post_norm_in_modulation: bool = False
  normalize_modulator: bool = False
  stage_norms: bool = False
  ln_eps: float = 1e-5
  native_resolution: tuple[int, int] = (224, 224)
  num_stages: int | None = None  # keep only the first k stages (decapitation)
  drop_path: float = 0.0
  dtype: str = "float32"
  remat: bool = False

  @property
  def stages(self) -> int:
    return len(self.depths) if self.num_stages is None else self.num_stages

  def stage_grids(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """(rows, cols) of every kept stage's output map for an input of `image_size`."""
    grid = tuple(conv_out_size(n, *self.stem_conv) for n in image_size)
    grids = [grid]
    for _ in range(1, self.stages):
      grid = tuple(conv_out_size(n, *self.down_conv) for n in grid)
      grids.append(grid)
    return grids

  def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of `tokens` for an input of `image_size`."""
    return self.stage_grids(image_size)[-1]

  @nn.compact
  def __call__(self, images, train: bool = False, return_blocks: bool = False):
    layers.check_images(images)
    if self.norm_placement not in NORM_PLACEMENTS:
      raise ValueError(f"norm_placement={self.norm_placement!r}; valid: {NORM_PLACEMENTS}")
    if not 1 <= self.stages <= len(self.depths):
      raise ValueError(f"num_stages={self.num_stages} must be in 1..{len(self.depths)}")
    dtype = jnp.dtype(self.dtype)
    b, h, w, _ = images.shape
    min_grid = min(min(g) for g in self.stage_grids((h, w)))
    if min_grid < 1:
      raise ValueError(f"image size {h}x{w} is too small for this FocalNet")
    x = ConvEmbed(self.embed_dim, tuple(self.stem_conv), self.ln_eps, dtype,
                  name="patch_embed")(images.astype(dtype))

    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    total_blocks = sum(self.depths)
    block_index = 0
    blocks = []
    for s in range(self.stages):
      dim = self.embed_dim * 2 ** s
      for i in range(self.depths[s]):
        rate = self.drop_path * block_index / max(total_blocks - 1, 1)
        x = block_cls(self.focal_levels[s], self.focal_windows[s], self.mlp_ratio,
                      self.norm_placement, self.dw_residual, self.layerscale,
                      self.post_norm_in_modulation, self.normalize_modulator, rate, self.ln_eps,
                      dtype, name=f"layers_{s}_blocks_{i}")(x, train)
        block_index += 1
      out = x
      if self.stage_norms or s == len(self.depths) - 1:
        out = layers.LayerNorm(epsilon=self.ln_eps, dtype=dtype, name=f"norm{s}")(out)
      if return_blocks:
        blocks.append(out.reshape(b, -1, dim).astype(jnp.float32))
      if s < self.stages - 1:
        x = ConvEmbed(2 * dim, tuple(self.down_conv), self.ln_eps, dtype,
                      name=f"layers_{s}_downsample")(x)

    result = {"pooled": out.mean(axis=(1, 2)).astype(jnp.float32),
              "tokens": out.reshape(b, -1, out.shape[-1]).astype(jnp.float32)}
    if return_blocks:
      result["blocks"] = blocks
    return result


_SEEM = dict(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(3, 3, 3, 3),
             focal_windows=(3, 3, 3, 3), stem_conv=(7, 4, 3), down_conv=(3, 2, 1),
             norm_placement="post_add", dw_residual=True, layerscale=True,
             normalize_modulator=True, stage_norms=True)

# timm's large+ models: overlapped convs, post-norm in the branch, LayerScale.
_TIMM_LARGE = dict(depths=(2, 2, 18, 2), stem_conv=(7, 4, 2), down_conv=(3, 2, 1),
                   norm_placement="post", layerscale=True)


def _timm(embed_dim, depths, levels, windows=3, **kw):
  return dict(embed_dim=embed_dim, depths=tuple(depths), focal_levels=(levels,) * 4,
              focal_windows=(windows,) * 4, **kw)


MODELS = {
    # SEEM's FocalNet-T (seem_focalt_v0.pt / v1.pt, `backbone.*`).
    "seem_focalt": _SEEM,
    # timm FocalNet, ImageNet classification checkpoints (backbone only, head dropped).
    "focalnet_tiny_srf": _timm(96, (2, 2, 6, 2), 2),
    "focalnet_small_srf": _timm(96, (2, 2, 18, 2), 2),
    "focalnet_base_srf": _timm(128, (2, 2, 18, 2), 2),
    "focalnet_tiny_lrf": _timm(96, (2, 2, 6, 2), 3),
    "focalnet_small_lrf": _timm(96, (2, 2, 18, 2), 3),
    "focalnet_base_lrf": _timm(128, (2, 2, 18, 2), 3),
    "focalnet_large_fl3": _timm(192, **_TIMM_LARGE, levels=3, windows=5),
    "focalnet_large_fl4": _timm(192, **_TIMM_LARGE, levels=4),
    "focalnet_xlarge_fl3": _timm(256, **_TIMM_LARGE, levels=3, windows=5),
    "focalnet_xlarge_fl4": _timm(256, **_TIMM_LARGE, levels=4),
    "focalnet_huge_fl3": _timm(352, **_TIMM_LARGE, levels=3, post_norm_in_modulation=True),
    "focalnet_huge_fl4": _timm(352, **_TIMM_LARGE, levels=4, post_norm_in_modulation=True),
}
