"""Classifier heads on a foundation model, and the composed classifier the trainer trains.

`Classifier` = foundation (any registered model) + a head:
  linear   Dense(num_classes) on the foundation's `pooled` feature;
  deit     the paper's stacked classifier: foundation tokens -> Linear(F, 768) -> LayerNorm ->
           DeiT-B's own CLS token and position embedding (resized to the foundation's token grid
           as the paper's DeiT does, sqrt(n_new / n_old)) -> DeiT-B's 12 blocks -> norm -> CLS ->
           Dense(num_classes). DeiT-B's patch embedding is bypassed (it has no parameters here).

`Segmenter` = MedDINOv3's 2-D segmentation network (Primus_Multiscale): a DINOv3 backbone's
final-normed patch tokens from blocks `interaction_indices`, concatenated along channels (no
projection), decoded by log2(patch) stages of [2x2 stride-2 transposed conv -> channel LayerNorm
(eps 1e-6) -> GELU], each halving the channels, then a 1x1 conv to class logits at full resolution.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfjax.models import layers, posemb


def new_linear(features: int, fan_in: int, name: str, dtype=None) -> nn.Dense:
  """A freshly initialised nn.Linear as PyTorch makes it (the paper's heads and projector): weight
  and bias uniform in ±1/sqrt(fan_in). Flax's default (LeCun normal, zero bias) starts the logits
  about sqrt(3) times larger."""
  bound = fan_in ** -0.5
  return layers.Dense(features, dtype=dtype, name=name,
                      kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                      bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                                         -bound, bound))


class StackedDeiT(nn.Module):
  """DeiT-B on top of foundation tokens. Parameter names follow `vit.Model`, so a converted
  DeiT-B checkpoint's `cls_token`, `pos_embed`, `blocks_*` and `norm` load into it directly."""
  num_classes: int
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_hidden: int = 3072
  ln_eps: float = 1e-6
  native_grid: tuple[int, int] = (14, 14)
  posemb: str = "deit_sqrt"
  drop_path: float = 0.0
  dtype: str = "float32"
  attn_impl: str | None = None
  remat: bool = False
  remat_policy: str = "block"    # layers.REMAT_POLICIES
  attn_query_chunk: int = 0      # > 0: attend this many queries at a time (memory at 1024 px)

  @nn.compact
  def __call__(self, tokens, grid, train: bool = False, return_blocks: bool = False):
    dtype = jnp.dtype(self.dtype)
    b = tokens.shape[0]
    x = new_linear(self.width, tokens.shape[-1], "projector", dtype)(tokens.astype(dtype))
    x = layers.LayerNorm(epsilon=1e-5, dtype=layers.STREAM, name="projector_norm")(x)  # torch default eps
    gh, gw = self.native_grid
    init = nn.initializers.truncated_normal(0.02)
    pos = self.param("pos_embed", init, (1, 1 + gh * gw, self.width))
    grid_pos = posemb.resample_grid(pos[0, 1:].reshape(gh, gw, self.width), grid, self.posemb)
    cls = self.param("cls_token", init, (1, 1, self.width)) + pos[:, :1]
    x = x + grid_pos.reshape(1, -1, self.width)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
    block_cls, extra = layers.block_class(self.remat, self.remat_policy)
    blocks = []
    for i in range(self.depth):
      x = block_cls(self.heads, self.mlp_hidden, "gelu", True, self.ln_eps, False,
                    self.drop_path * i / max(self.depth - 1, 1), dtype, self.attn_impl, **extra,
                    attn_query_chunk=self.attn_query_chunk, name=f"blocks_{i}")(x, train)
      blocks.append(x.astype(jnp.float32))
    cls_out = layers.LayerNorm(epsilon=self.ln_eps, dtype=dtype, name="norm")(x)[:, 0]
    logits = new_linear(self.num_classes, self.width, "fc", dtype)(cls_out)
    return logits.astype(jnp.float32), cls_out.astype(jnp.float32), (blocks if return_blocks else [])


class Classifier(nn.Module):
  """foundation + head. `foundation_train` runs the foundation in training mode (drop-path,
  BatchNorm batch statistics); the trainer sets it False when the foundation is frozen."""
  foundation: nn.Module
  num_classes: int
  head: str = "linear"           # linear | deit
  head_kwargs: tuple = ()        # StackedDeiT fields, as (name, value) pairs (hashable)

  @nn.compact
  def __call__(self, images, train: bool = False, foundation_train: bool | None = None,
               return_blocks: bool = False):
    foundation_train = train if foundation_train is None else foundation_train
    out = self.foundation(images, train=foundation_train, return_blocks=return_blocks)
    result = {"foundation_blocks": out.get("blocks", [])}
    if self.head == "linear":
      result["embedding"] = out["pooled"]
      result["logits"] = new_linear(self.num_classes, out["pooled"].shape[-1], "fc")(out["pooled"])
    elif self.head == "deit":
      grid = self.foundation.token_grid(images.shape[1:3])
      head = StackedDeiT(self.num_classes, **dict(self.head_kwargs), name="stacked")
      result["logits"], result["embedding"], result["head_blocks"] = head(
          out["tokens"], grid, train, return_blocks)
    else:
      raise ValueError(f"unknown head {self.head!r}; valid: linear, deit")
    return result


class LinearProbe(nn.Module):
  """The linear head alone, on precomputed foundation features (frozen_linear without augmentation)."""
  num_classes: int

  @nn.compact
  def __call__(self, features, train: bool = False, foundation_train: bool | None = None,
               return_blocks: bool = False):
    return {"logits": new_linear(self.num_classes, features.shape[-1], "fc")(features), "embedding": features,
            "foundation_blocks": []}


# nnU-Net's InitWeights_He(1e-2): kaiming_normal_(a=0.01) with torch's fan-in, which for a
# transposed conv's (in, out, kh, kw) weight is out * kh * kw.
_HE_GAIN = 2.0 / (1.0 + 0.01 ** 2)


class TransposedConv2x2(nn.Module):
  """torch's ConvTranspose2d(k=2, s=2): every input pixel becomes a 2x2 block, one matmul.

  `kernel` is (in, 2 * 2 * out) in (row, col, out) order: torch's weight.permute(0, 2, 3, 1)."""
  features: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    b, h, w, _ = x.shape
    dtype = jnp.dtype(self.dtype)
    init = nn.initializers.variance_scaling(_HE_GAIN, "fan_out", "normal")
    y = layers.dense(layers.Dense(4 * self.features, use_bias=False, dtype=dtype, kernel_init=init,
                                  name="up"), x.astype(dtype))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(dtype)


class PatchDecoder(nn.Module):
  """(B, h, w, C) features of a patch-`patch_size` grid -> (B, h * p, w * p, num_classes) logits."""
  num_classes: int
  patch_size: int = 16
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    stages = int(round(math.log2(self.patch_size)))
    if 2 ** stages != self.patch_size:
      raise ValueError(f"the decoder upsamples by 2 per stage: patch size {self.patch_size} is not a power of 2")
    dtype = jnp.dtype(self.dtype)
    channels = x.shape[-1]
    for stage in range(stages):
      channels //= 2
      if channels < 1:
        raise ValueError(f"{x.shape[-1]} input channels cannot be halved {stages} times")
      x = TransposedConv2x2(channels, self.dtype, name=f"up_{stage}")(x)
      x = layers.LayerNorm(epsilon=1e-6, dtype=dtype, name=f"norm_{stage}")(x)
      x = layers.gelu(x)
    init = nn.initializers.variance_scaling(_HE_GAIN, "fan_in", "normal")
    logits = layers.dense(layers.Dense(self.num_classes, dtype=dtype, kernel_init=init, name="classifier"), x)
    return logits.astype(jnp.float32)


class Segmenter(nn.Module):
  """MedDINOv3's Primus_Multiscale: `foundation` must be a DINOv3-family model whose `intermediate`
  field names `interaction_indices`. One-channel inputs are repeated to three (no re-normalisation);
  other channel counts go to a patch embedding that takes them (segment.adapt_patch_embed fills it
  from RGB weights)."""
  foundation: nn.Module
  num_classes: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    if not getattr(self.foundation, "intermediate", ()):
      raise ValueError("the segmentation backbone must be created with intermediate=(block, ...), "
                       "e.g. (2, 5, 8, 11) for ViT-B")
    out = self.foundation(images, train=train)
    rows, cols = self.foundation.token_grid(images.shape[1:3])
    feats = jnp.concatenate(out["intermediate"], axis=-1)
    feats = feats.reshape(feats.shape[0], rows, cols, feats.shape[-1])
    return PatchDecoder(self.num_classes, self.foundation.patch_size, self.dtype, name="decoder")(feats)
