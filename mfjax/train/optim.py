"""AdamW as the paper uses it, a linear warmup, and ReduceLROnPlateau on the validation metric.

The learning rate is computed on the host and passed to the jitted step, so the plateau rule
(which depends on validation results) needs no traced state.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from mfjax.config import ConfigError, check_choice


# The range of each optimizer value a config may hold (classification, segmentation, pretraining):
# (lowest, lowest allowed, highest, highest allowed). A value outside would train without complaint
# (a negative learning rate climbs the loss) and enter sweeps and reports as a normal cell.
OPTIM_RANGES = {
    "lr": (0, False, math.inf, False), "lr_decoder": (0, False, math.inf, False),
    "lr_backbone": (0, True, math.inf, False), "base_lr": (0, False, math.inf, False),
    "min_lr": (0, True, math.inf, False), "warmup_start": (0, True, math.inf, False),
    "weight_decay": (0, True, math.inf, False), "final_weight_decay": (0, True, math.inf, False),
    "clip_norm": (0, True, math.inf, False),   # 0: no clipping
    "b1": (0, True, 1, False), "b2": (0, True, 1, False), "eps": (0, False, math.inf, False),
    "plateau_factor": (0, False, 1, True),  # 1: the learning rate never drops
    "poly_exponent": (0, False, math.inf, False),
    "layer_decay": (0, False, 1, True), "patch_embed_lr_mult": (0, True, math.inf, False),
    "warmup_epochs": (0, True, math.inf, False), "warmup_steps": (0, True, math.inf, False),
}


def check_optim(optim) -> None:
  """Every optimizer value of the config within its range (`OPTIM_RANGES`), or an error naming it."""
  check_choice("optim.mu_dtype", optim.get("mu_dtype", "") or "", ("", "bfloat16", "float16", "float32"))
  patience = optim.get("plateau_patience", -1)
  if isinstance(patience, bool) or not isinstance(patience, int) or patience < -1:
    raise ConfigError(f"optim.plateau_patience={patience!r} must be an int >= 0, or -1 (off)")
  for key, (low, low_ok, high, high_ok) in OPTIM_RANGES.items():
    if key not in optim:
      continue
    value = optim[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
      raise ConfigError(f"optim.{key}={value!r} must be a number")
    if not ((value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)):
      bounds = f"{'[' if low_ok else '('}{low}, {high if high < math.inf else 'inf'}{']' if high_ok else ')'}"
      raise ConfigError(f"optim.{key}={value!r} is outside {bounds}")


def decay_mask(params, one_dim_in_torch: tuple[str, ...] = ()):
  """Weight decay everywhere except biases and 1-D parameters (norm scales, LayerScale), and the
  parameters named (as "foundation/cls_token") in `one_dim_in_torch`: 1-D in the PyTorch original."""
  def rule(path, x):
    keys = [getattr(k, "key", str(k)) for k in path]
    return x.ndim > 1 and keys[-1] != "bias" and "/".join(keys) not in one_dim_in_torch
  return jax.tree_util.tree_map_with_path(rule, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch's clip_grad_norm_: every gradient times min(1, max_norm / (global norm + 1e-6)).

  One scalar multiplies each gradient, so XLA fuses the clipping into Adam's moment updates;
  optax's version divides every element by the norm, which XLA:CPU writes out as a clipped copy
  of the gradients first (clip + AdamW over ViT-B's parameters alone: 177 -> 103 ms on 2 cores).
  """
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(params, clip_norm=1.0, weight_decay=1e-5, b1=0.9, b2=0.999, eps=1e-8,
                   mu_dtype=None, decay_everything=False,
                   one_dim_in_torch: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Gradient transform whose output, times -lr, is torch's AdamW update (decoupled decay).

  Weight decay skips biases and 1-D parameters unless `decay_everything` (MedDINOv3's nnU-Net
  trainer decays every parameter)."""
  return optax.chain(
      clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None),
      optax.add_decayed_weights(weight_decay,
                                mask=None if decay_everything else decay_mask(params, one_dim_in_torch)),
  )


def warmup_lr(step: int, base_lr: float, warmup_steps: int, start: float = 1e-8) -> float:
  """The paper's LinearWarmup: `start` at step 0, + (base - start) / warmup per step, then base."""
  if warmup_steps <= 0 or step >= warmup_steps:
    return base_lr
  return start + step * (base_lr - start) / warmup_steps


@dataclasses.dataclass
class Plateau:
  """torch's ReduceLROnPlateau(mode='max', factor, patience, threshold=1e-4 relative, eps=1e-8):
  `scale` multiplies the base learning rate `lr`; a cut smaller than eps is not made."""
  patience: int = 2
  factor: float = 0.1
  threshold: float = 1e-4
  lr: float = 1.0
  eps: float = 1e-8
  scale: float = 1.0
  best: float | None = None
  bad_epochs: int = 0

  def __post_init__(self):
    if self.best is not None and not math.isfinite(self.best):  # saved by an mfjax that kept a NaN
      self.best = None

  def update(self, metric: float, in_warmup: bool = False) -> bool:
    """Record one epoch's validation metric; True when the learning rate was just reduced. An epoch
    that ended `in_warmup` is not counted: a cut there would scale the whole run here, while the
    paper's code adds its warmup increments to the cut learning rate and so undoes most of it."""
    if self.patience < 0 or metric is None or in_warmup:
      return False
    if math.isfinite(metric) and (self.best is None or metric > self.best * (1 + self.threshold)):
      self.best, self.bad_epochs = metric, 0  # a NaN metric is a bad epoch, as in torch (best starts at -inf)
      return False
    self.bad_epochs += 1
    if self.bad_epochs > self.patience:
      self.bad_epochs = 0
      if self.lr * self.scale * (1 - self.factor) > self.eps:  # torch: near 1e-8 the rate stops falling
        self.scale *= self.factor
        return True
    return False
