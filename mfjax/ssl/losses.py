"""DINOv3's self-distillation losses (DV3 `loss/*` and `train/ssl_meta_arch.py`), in float32.

  sinkhorn_knopp   teacher centering: 3 Sinkhorn-Knopp iterations on exp(logits / temperature)
  dino_loss        cross-entropy between student crops and teacher crops (optionally s != t only)
  dino_cls_loss    DINOv3's weighting of the local-vs-global and global-vs-global terms
  ibot_loss        masked-patch cross-entropy, each image normalised by its own number of masks
  koleo_loss       Kozachenko-Leonenko entropy estimator on L2-normalised features
  gram_loss        Gram anchoring: MSE between the student's and a frozen teacher's patch Grams

Multiple devices: inside `jax.jit` on sharded global arrays every sum is already global, so no
argument is needed. Under `shard_map` or `pmap`, pass `axis_name` to `sinkhorn_knopp`: its sums
over prototypes and samples are then all-reduced across that axis, as DINOv3's `all_reduce`
does, and B counts the samples on every device.
"""
import jax
import jax.numpy as jnp

from mfjax.models import posemb


def l2_normalize(x, eps: float = 1e-12):
  """F.normalize(x, dim=-1, eps): x / max(||x||, eps), with a finite gradient at x = 0 (as torch's)."""
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def sinkhorn_knopp(teacher_logits, temperature, iterations: int = 3, axis_name: str | None = None):
  """Teacher targets (B, K), each row a distribution, from teacher head outputs (B, K).

  Q = exp(t / temperature)^T (K x B), divided by its sum; then `iterations` times: rows divided by
  their sums and by K, columns by their sums and by B; finally Q * B, transposed. A global
  maximum is subtracted before exp: the normalisation removes it, and exp cannot overflow.
  """
  all_sum = (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)
  logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  top = logits.max()
  if axis_name:
    top = jax.lax.pmax(top, axis_name)
  q = jnp.exp(logits - top).T
  k, b = q.shape[0], all_sum(jnp.float32(q.shape[1]))
  q = q / all_sum(q.sum())
  for _ in range(iterations):
    q = q / all_sum(q.sum(axis=1, keepdims=True)) / k
    q = q / q.sum(axis=0, keepdims=True) / b
  return (q * b).T


def dino_loss(student_logits, teacher_probs, student_temp: float = 0.1, ignore_diagonal: bool = False):
  """-sum_{s,t,b} p_t . log_softmax(z_s / temp), student (S, B, K) against teacher (T, B, K),
  averaged over batch and pairs; with `ignore_diagonal`, pairs s == t are left out."""
  n_student, b, _ = student_logits.shape
  n_teacher = teacher_probs.shape[0]
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  pair_losses = -jnp.einsum("sbk,tbk->st", log_p, teacher_probs, precision="highest")
  if not ignore_diagonal:
    return pair_losses.sum() / (b * n_student * n_teacher)
  n_diag = min(n_student, n_teacher)
  off_diagonal = 1.0 - jnp.eye(n_student, n_teacher, dtype=pair_losses.dtype)
  return (pair_losses * off_diagonal).sum() / (b * n_student * n_teacher - b * n_diag)


def dino_cls_loss(student_global, student_local, teacher_probs, local_weight: float = 1.0,
                  student_temp: float = 0.1) -> dict:
  """DINOv3's CLS loss: local crops (L, B, K) against both teacher globals, and the student's
  globals (G, B, K) against the other teacher global, weighted by their share of the pairs:
  (L*G / total) * local_weight * L_local + (G*(G-1) / total) * L_global."""
  n_global, n_local = student_global.shape[0], student_local.shape[0]
  local_terms, global_terms = n_local * n_global, n_global * (n_global - 1)
  total_terms = local_terms + global_terms
  local = dino_loss(student_local, teacher_probs, student_temp)
  global_ = dino_loss(student_global, teacher_probs, student_temp, ignore_diagonal=True)
  total = local_terms / total_terms * local_weight * local + global_terms / total_terms * global_
  return {"dino": total, "dino_local": local, "dino_global": global_}


def ibot_loss(student_logits, teacher_probs, weights, n_images: int, student_temp: float = 0.1):
  """(1 / n_images) sum over masked patches of weight * CE, for (M, K) masked-patch logits and
  targets; `weights` (M,) is 1 / (masked patches of that patch's image), and `n_images` counts
  every global crop, masked or not."""
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  per_patch = jnp.sum(teacher_probs * log_p, axis=-1)
  return -jnp.sum(per_patch * weights) / n_images


def koleo_loss(features, eps: float = 1e-8, group_size: int = 0):
  """-mean log(distance to the nearest other sample + eps) of L2-normalised (B, D) features.

  As DINOv3 (`nn.PairwiseDistance(2, eps)`), eps is also added to the difference vector before
  its norm, so the distance (and its gradient) stays finite for duplicate samples.
  group_size > 0: neighbours are sought within consecutive groups of that many samples, and the
  groups' losses averaged, as DINOv3's KoLeo on each GPU's share of the batch.
  """
  if group_size and group_size != features.shape[0]:
    grouped = features.reshape(-1, group_size, features.shape[-1])
    return jnp.mean(jax.vmap(lambda x: koleo_loss(x, eps))(grouped))
  x = features.astype(jnp.float32)
  x = l2_normalize(x, eps)
  dots = jnp.matmul(x, x.T, precision="highest")
  dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
  nearest = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))
  distances = jnp.linalg.norm(x - x[nearest] + eps, axis=-1)
  return -jnp.mean(jnp.log(distances + eps))


def gram_loss(student_tokens, teacher_tokens, student_grid: tuple[int, int], teacher_grid: tuple[int, int],
              img_level: bool = True, groups: int = 1):
  """MSE between the Gram matrices of L2-normalised student (B, N, D) and teacher (B, Nt, D) patch
  tokens. Teacher tokens on another grid are first resized to the student's (bicubic,
  align_corners=False, no antialias). img_level: one N x N Gram per image; otherwise one
  (B/groups N) x (B/groups N) Gram over each of `groups` consecutive parts of the batch (DINOv3's
  over each GPU's batch; pass the device count)."""
  b, _, d = teacher_tokens.shape
  teacher = jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32)
  if tuple(teacher_grid) != tuple(student_grid):
    teacher = posemb.interpolate(teacher.reshape(b, *teacher_grid, d), size=tuple(student_grid))
    teacher = teacher.reshape(b, -1, d)
  student, teacher = l2_normalize(student_tokens.astype(jnp.float32)), l2_normalize(teacher)
  if not img_level:
    student, teacher = student.reshape(groups, -1, d), teacher.reshape(groups, -1, d)
  gram = lambda x: jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision="highest")
  return jnp.mean((gram(student) - gram(teacher)) ** 2)
