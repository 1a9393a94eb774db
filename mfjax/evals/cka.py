"""Linear centred kernel alignment (CKA) between layer representations.

  linear_cka(x, y)   CKA of two (n, p) and (n, q) representations of the same n examples,
                     with the plain (biased) HSIC of centred Gram matrices (Kornblith et al. 2019):
                     ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc = X with column means removed.
  MinibatchCKA       CKA between every layer of model A and every layer of model B, accumulated
                     over minibatches with the unbiased HSIC estimator (Song et al. 2012) and
                     averaged as in Nguyen, Raghu & Kornblith 2021 ("Do wide and deep networks
                     learn the same things?"): CKA = mean_i HSIC1(K_i, L_i) /
                     sqrt(mean_i HSIC1(K_i, K_i) mean_i HSIC1(L_i, L_i)). Memory is one batch of
                     Gram matrices per layer, so it scales to a whole test split.

Both are invariant to isotropic scaling and to orthogonal transforms of either representation.

Layer outputs of vision transformers are (B, tokens, D). The caller reduces them to one vector
per image with `pool_tokens` (mean over tokens, or over H and W for a feature map) before CKA:
this compares image-level representations, needs no spatial alignment between models with
different token grids (DINOv2 16x16, SEEM 7x7), and costs B x D instead of B x tokens x D.

`result_json` writes what `mfjax report` draws as a heatmap: kind "layers" (a pretrained model
against its fine-tuned self, the paper's Fig. 7), "foundations" (last layers of several
foundations, Fig. 8) or "stacked" (the stacked DeiT classifier before/after, Fig. A.1).
"""
from typing import Sequence

import numpy as np

KINDS = ("layers", "foundations", "stacked")


def pool_tokens(x) -> np.ndarray:
  """(B, ..., D) -> (B, D): the mean over every axis between the batch and the feature axis."""
  x = np.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"features must be at least (B, D), got shape {x.shape}")
  return x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1) if x.ndim > 2 else x


def _as_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be (examples, features), got shape {x.shape}; pool tokens first "
                     "(mfjax.evals.cka.pool_tokens)")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has non-finite values")
  return x


def linear_cka(x, y) -> float:
  """Linear CKA of x (n, p) and y (n, q); NaN when either is constant over the examples."""
  x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} examples, y has {len(y)}")
  if len(x) < 2:
    raise ValueError("CKA needs at least 2 examples")
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  if len(x) < max(x.shape[1], y.shape[1]):  # fewer examples than features: use n x n Gram matrices
    k, l = x @ x.T, y @ y.T
    cross, norm_x, norm_y = np.sum(k * l), np.linalg.norm(k), np.linalg.norm(l)
  else:
    cross = np.linalg.norm(y.T @ x) ** 2
    norm_x, norm_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
  if norm_x == 0 or norm_y == 0:
    return float("nan")
  return float(cross / (norm_x * norm_y))


def _grams_without_diagonal(features: Sequence, name: str) -> np.ndarray:
  """(L, B, B) linear Gram matrices of each layer's (B, D_l) features, diagonals set to 0."""
  mats = [_as_matrix(f, f"{name}[{i}]") for i, f in enumerate(features)]
  sizes = {len(m) for m in mats}
  if len(sizes) != 1:
    raise ValueError(f"layers of {name} have different batch sizes {sorted(sizes)}")
  # HSIC_1 does not change when a constant is added to every example's features, but an
  # uncentred Gram matrix makes it a difference of huge near-equal sums (NaN for offsets ~1e3).
  grams = np.stack([(m - m.mean(axis=0)) @ (m - m.mean(axis=0)).T for m in mats])
  idx = np.arange(grams.shape[1])
  grams[:, idx, idx] = 0.0
  return grams


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> np.ndarray:
  """HSIC_1 (Song et al. 2012) between every K in k (A, n, n) and L in l (B, n, n) -> (A, B).

  K and L must have zero diagonals. HSIC_1 = [tr(KL) + 1'K1 1'L1 / ((n-1)(n-2))
  - 2/(n-2) 1'KL1] / (n(n-3)).
  """
  n = k.shape[1]
  trace = np.einsum("aij,bij->ab", k, l)
  sums = np.outer(k.sum(axis=(1, 2)), l.sum(axis=(1, 2))) / ((n - 1) * (n - 2))
  rows = k.sum(axis=2) @ l.sum(axis=2).T * (2.0 / (n - 2))
  return (trace + sums - rows) / (n * (n - 3))


def _self_hsic(k: np.ndarray) -> np.ndarray:
  """The diagonal of unbiased_hsic(k, k): (A,) HSIC_1 of each K with itself."""
  n = k.shape[1]
  row_sums = k.sum(axis=2)
  return (np.einsum("aij,aij->a", k, k) + k.sum(axis=(1, 2)) ** 2 / ((n - 1) * (n - 2))
          - np.einsum("ai,ai->a", row_sums, row_sums) * (2.0 / (n - 2))) / (n * (n - 3))


class MinibatchCKA:
  """Accumulates the (layers_a x layers_b) CKA matrix over minibatches of the same examples.

    cka = MinibatchCKA()
    for batch in data:
      cka.update([pool_tokens(b) for b in blocks_a(batch)], [pool_tokens(b) for b in blocks_b(batch)])
    matrix = cka.result()     # (len(layers_a), len(layers_b))

  Every update needs at least 4 examples (the unbiased estimator's n(n-3)); use batches of
  a few hundred for a low-variance estimate. `feats_b=None` compares A with itself.
  """

  def __init__(self):
    self.cross = None   # sum over batches of HSIC_1(K_a, L_b)
    self.self_a = None  # sum over batches of HSIC_1(K_a, K_a)
    self.self_b = None
    self.num_batches = 0
    self.num_examples = 0

  def update(self, feats_a: Sequence, feats_b: Sequence | None = None) -> None:
    if not len(feats_a) or (feats_b is not None and not len(feats_b)):
      raise ValueError("update needs at least one layer on each side")
    k = _grams_without_diagonal(feats_a, "feats_a")
    l = k if feats_b is None else _grams_without_diagonal(feats_b, "feats_b")
    n = k.shape[1]
    if l.shape[1] != n:
      raise ValueError(f"feats_a has {n} examples per layer, feats_b has {l.shape[1]}")
    if n < 4:
      raise ValueError(f"a minibatch needs at least 4 examples for the unbiased HSIC, got {n}")
    if self.cross is not None and self.cross.shape != (len(k), len(l)):
      raise ValueError(f"this accumulator holds {self.cross.shape[0]} x {self.cross.shape[1]} layers, "
                       f"the update has {len(k)} x {len(l)}")
    cross = unbiased_hsic(k, l)
    self_a = _self_hsic(k)
    self_b = self_a if feats_b is None else _self_hsic(l)
    if self.cross is None:
      self.cross, self.self_a, self.self_b = cross, self_a, self_b
    else:
      self.cross, self.self_a, self.self_b = self.cross + cross, self.self_a + self_a, self.self_b + self_b
    self.num_batches += 1
    self.num_examples += n

  def result(self) -> np.ndarray:
    """(layers_a, layers_b) CKA; NaN where a layer's self-HSIC is not positive (constant features)."""
    if self.cross is None:
      raise ValueError("no minibatch was added")
    denominator = np.sqrt(np.outer(np.maximum(self.self_a, 0), np.maximum(self.self_b, 0)))
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(denominator > 0, self.cross / denominator, np.nan)


def result_json(kind: str, rows: Sequence[str], cols: Sequence[str], matrix, **extra) -> dict:
  """The content of RUN_DIR/cka_<name>.json that `mfjax report` draws as a heatmap.

  rows/cols label the matrix's axes (layer names, or foundation names). `extra` may carry
  "title", "row_axis", "col_axis" (axis titles), "dataset", "model", "num_examples".
  """
  if kind not in KINDS:
    raise ValueError(f"kind {kind!r} is not one of {KINDS}")
  matrix = np.asarray(matrix, np.float64)
  if matrix.shape != (len(rows), len(cols)):
    raise ValueError(f"matrix {matrix.shape} does not match {len(rows)} row and {len(cols)} column labels")
  values = [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix]
  return {"kind": kind, "rows": list(map(str, rows)), "cols": list(map(str, cols)), "matrix": values, **extra}
