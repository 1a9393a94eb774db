"""ResNet-50/101/152 as in torchvision (bottleneck v1.5: the stride sits on the 3x3 conv).

timm's `resnet50/101/152` are the same network with the same parameter names.
BatchNorm follows torch exactly: with `train=False` it uses the running statistics (a frozen
backbone); with `train=True` it normalises with the batch statistics and updates the running
ones (the caller passes `mutable=["batch_stats"]`), the variance entering the running average
unbiased, as torch does.

  pooled  global average of the last stage's map (2048-d).
  tokens  that map flattened, (B, rows*cols, 2048): 7x7 = 49 tokens at 224.
  blocks  each stage's output (layer1..layer4) as (B, rows_s*cols_s, C_s) tokens: the stages
          are what progressive freezing and decapitation cut at.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mfjax.models import layers

STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d on NHWC maps; `momentum` in torch's convention (weight of the batch)."""
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train:
      xf = x.astype(jnp.float32)
      mean = xf.mean(axis=(0, 1, 2))
      var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)).astype(self.dtype)


class PointwiseConv(nn.Module):
  """A 1x1 convolution computed as a matmul on flattened rows, with nn.Conv's parameter (kernel
  (1, 1, C_in, C_out)) so that checkpoints load the same. Same result as nn.Conv; on CPU the
  ResNet-152 train step is 3.5x faster: XLA:CPU computed a 1x1 nn.Conv's kernel gradient from a
  (C, H, W, N)-transposed copy of the activations at ~190 ns per element (BENCHMARKS.md)."""
  features: int
  stride: int = 1
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features))
    if self.stride > 1:  # padding 0: the output samples every stride-th position from the first
      x = x[:, ::self.stride, ::self.stride]
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    rows = x.reshape(-1, x.shape[-1]) @ kernel[0, 0]
    return rows.reshape(*x.shape[:-1], self.features)


def _unfused_identity(x, token):
  # A conditional on a predicate XLA cannot fold (False only for a NaN token; both branches
  # return x): XLA fuses no elementwise op across it, so x is computed once and stored.
  return jax.lax.cond(token == token, lambda v: v, lambda v: v + 0, x)


@jax.custom_vjp
def materialized(x, token):
  """x, stored once, in the forward and the backward pass. XLA:CPU otherwise fuses the residual
  stream relu(x + bn(conv(...))) of every block into its consumers and recomputes it from all
  earlier blocks, forward and backward: 36 blocks deep in ResNet-152's third stage, 1.7 s of a
  7.5 s train step (BENCHMARKS.md). `token`: a small replicated scalar (a BatchNorm bias), so
  the predicate needs no collective under a batch-sharded mesh."""
  return _unfused_identity(x, token)


materialized.defvjp(lambda x, token: (_unfused_identity(x, token), token),
                    lambda token, g: (_unfused_identity(g, token), jnp.zeros_like(token)))


class Bottleneck(nn.Module):
  width: int
  stride: int = 1
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_dim = self.width * EXPANSION

    def conv(features, k, stride, name):
      if k == 1:
        return PointwiseConv(features, stride, self.dtype, name=name)
      return nn.Conv(features, (k, k), (stride, stride), padding=((k // 2, k // 2),) * 2, use_bias=False,
                     kernel_init=conv_init, dtype=self.dtype, name=name)

    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)
    y = nn.relu(bn("bn1")(conv(self.width, 1, 1, "conv1")(x), train))
    y = nn.relu(bn("bn2")(conv(self.width, 3, self.stride, "conv2")(y), train))
    bn3 = bn("bn3")
    y = bn3(conv(out_dim, 1, 1, "conv3")(y), train)
    if self.stride != 1 or x.shape[-1] != out_dim:
      x = bn("downsample_bn")(conv(out_dim, 1, self.stride, "downsample_conv")(x), train)
    out = nn.relu(x + y)
    if jax.default_backend() == "cpu":
      out = materialized(out, bn3.variables["params"]["bias"][0])
    return out


class Model(nn.Module):
  depths: tuple[int, ...] = (3, 8, 36, 3)
  native_resolution: tuple[int, int] = (224, 224)
  num_stages: int | None = None  # keep only the first k stages (decapitation)
  dtype: str = "float32"
  remat: bool = False

  @property
  def stages(self) -> int:
    return len(self.depths) if self.num_stages is None else self.num_stages

  def stage_grids(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """(rows, cols) of every kept stage's output map for an input of `image_size`."""
    grid = tuple(conv_out_size(conv_out_size(n, 7, 2, 3), 3, 2, 1) for n in image_size)
    grids = [grid]
    for _ in range(1, self.stages):
      grid = tuple(conv_out_size(n, 3, 2, 1) for n in grid)
      grids.append(grid)
    return grids

  def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of `tokens` for an input of `image_size`."""
    return self.stage_grids(image_size)[-1]

  @nn.compact
  def __call__(self, images, train: bool = False, return_blocks: bool = False):
    layers.check_images(images)
    if not 1 <= self.stages <= len(self.depths):
      raise ValueError(f"num_stages={self.num_stages} must be in 1..{len(self.depths)}")
    dtype = jnp.dtype(self.dtype)
    b = images.shape[0]
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=conv_init, dtype=dtype, name="conv1")(images.astype(dtype))
    x = nn.relu(BatchNorm(dtype=dtype, name="bn1")(x, train))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))

    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    blocks = []
    for s in range(self.stages):
      for i in range(self.depths[s]):
        stride = 2 if s > 0 and i == 0 else 1
        x = block_cls(STAGE_WIDTHS[s], stride, dtype, name=f"layer{s + 1}_{i}")(x, train)
      if return_blocks:
        blocks.append(x.reshape(b, -1, x.shape[-1]).astype(jnp.float32))

    out = {"pooled": x.mean(axis=(1, 2)).astype(jnp.float32),
           "tokens": x.reshape(b, -1, x.shape[-1]).astype(jnp.float32)}
    if return_blocks:
      out["blocks"] = blocks
    return out


MODELS = {
    "resnet50": dict(depths=(3, 4, 6, 3)),
    "resnet101": dict(depths=(3, 4, 23, 3)),
    "resnet152": dict(depths=(3, 8, 36, 3)),
}
