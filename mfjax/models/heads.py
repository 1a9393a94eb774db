"""Classifier heads on a foundation model, and the composed classifier the trainer trains.

`Classifier` = foundation (any registered model) + a head:
  linear   Dense(num_classes) on the foundation's `pooled` feature;
  deit     the paper's stacked classifier: foundation tokens -> Linear(F, 768) -> LayerNorm ->
           DeiT-B's own CLS token and position embedding (resized to the foundation's token grid
           as the paper's DeiT does, sqrt(n_new / n_old)) -> DeiT-B's 12 blocks -> norm -> CLS ->
           Dense(num_classes). DeiT-B's patch embedding is bypassed (it has no parameters here).
"""
import flax.linen as nn
import jax.numpy as jnp

from mfjax.models import layers, posemb


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
    x = layers.Dense(self.width, dtype=dtype, name="projector")(tokens.astype(dtype))
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="projector_norm")(x)  # torch default eps
    gh, gw = self.native_grid
    init = nn.initializers.truncated_normal(0.02)
    pos = self.param("pos_embed", init, (1, 1 + gh * gw, self.width))
    grid_pos = posemb.resample_grid(pos[0, 1:].reshape(gh, gw, self.width), grid, self.posemb)
    cls = self.param("cls_token", init, (1, 1, self.width)) + pos[:, :1]
    x = x + grid_pos.reshape(1, -1, self.width).astype(dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(dtype), x], axis=1)
    block_cls, extra = layers.block_class(self.remat, self.remat_policy)
    blocks = []
    for i in range(self.depth):
      x = block_cls(self.heads, self.mlp_hidden, "gelu", True, self.ln_eps, False,
                    self.drop_path * i / max(self.depth - 1, 1), dtype, self.attn_impl, **extra,
                    attn_query_chunk=self.attn_query_chunk, name=f"blocks_{i}")(x, train)
      blocks.append(x.astype(jnp.float32))
    cls_out = nn.LayerNorm(epsilon=self.ln_eps, dtype=dtype, name="norm")(x)[:, 0]
    logits = layers.Dense(self.num_classes, dtype=dtype, name="fc")(cls_out)
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
      result["logits"] = nn.Dense(self.num_classes, name="fc")(out["pooled"])
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
    return {"logits": nn.Dense(self.num_classes, name="fc")(features), "embedding": features,
            "foundation_blocks": []}
