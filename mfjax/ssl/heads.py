"""DINOv3's projection head (`layers/dino_head.py`), used twice: on the CLS token (DINO) and on
masked patch tokens (iBOT), with separate parameters.

MLP in -> hidden -> GELU -> hidden -> GELU -> bottleneck (no batch norm), L2-normalise, then
`last_layer` = Linear(bottleneck, K) without bias. Unlike DINOv2 there is no weight norm on the
last layer. Linear weights start from a truncated normal (std 0.02), biases from zero.
"""
import flax.linen as nn
import jax.numpy as jnp

from mfjax.models import layers
from mfjax.ssl import losses


class DINOHead(nn.Module):
  out_dim: int                # K, the number of prototypes
  hidden_dim: int = 2048
  bottleneck_dim: int = 256

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.truncated_normal(0.02)
    x = x.astype(jnp.float32)
    x = layers.gelu(nn.Dense(self.hidden_dim, kernel_init=init, name="mlp_0")(x))
    x = layers.gelu(nn.Dense(self.hidden_dim, kernel_init=init, name="mlp_1")(x))
    x = nn.Dense(self.bottleneck_dim, kernel_init=init, name="mlp_2")(x)
    x = losses.l2_normalize(x)
    return nn.Dense(self.out_dim, use_bias=False, kernel_init=init, name="last_layer")(x)
