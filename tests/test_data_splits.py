"""mfjax.data.splits: stratified within two examples, groups intact, seeded, order-free."""
import numpy as np
import pytest

from mfjax.data import splits


def _one_hot(labels, k):
  out = np.zeros((len(labels), k), np.int64)
  out[np.arange(len(labels)), labels] = 1
  return out


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_split_is_stratified(fractions, seed):
  rng = np.random.default_rng(seed)
  labels = rng.choice(5, size=1000, p=[0.5, 0.1, 0.2, 0.05, 0.15])
  where = splits.assign(np.arange(1000), _one_hot(labels, 5), fractions, seed)
  for k in range(5):
    n_k = np.sum(labels == k)
    for s, f in enumerate(fractions):
      assert abs(np.sum((labels == k) & (where == s)) - f * n_k) < 2, (k, s)
  for s, f in enumerate(fractions):
    assert abs(np.sum(where == s) - f * 1000) < 1


def test_groups_never_straddle_and_labels_stay_balanced():
  rng = np.random.default_rng(5)
  groups = rng.integers(0, 400, 2000)          # ~5 examples per patient
  labels = (rng.random((2000, 14)) < np.linspace(0.02, 0.5, 14)).astype(int)
  where = splits.assign(groups, labels, (0.8, 0.1, 0.1), seed=0)
  for g in np.unique(groups):
    assert len(np.unique(where[groups == g])) == 1
  share = np.array([np.mean(where == s) for s in range(3)])
  np.testing.assert_allclose(share, [0.8, 0.1, 0.1], atol=0.02)
  for j in range(14):
    positives = labels[:, j] == 1
    assert abs(np.mean(where[positives] == 0) - 0.8) < 0.1, j


def test_split_is_seeded_and_independent_of_row_order():
  rng = np.random.default_rng(0)
  ids = np.array([f"img{i}" for i in range(300)])
  labels = _one_hot(rng.integers(0, 3, 300), 3)
  a = splits.assign(ids, labels, (0.8, 0.1, 0.1), seed=7)
  perm = rng.permutation(300)
  b = splits.assign(ids[perm], labels[perm], (0.8, 0.1, 0.1), seed=7)
  np.testing.assert_array_equal(a[perm], b)
  c = splits.assign(ids, labels, (0.8, 0.1, 0.1), seed=8)
  assert np.any(a != c)


def test_bad_fractions_are_rejected():
  with pytest.raises(ValueError, match="summing to 1"):
    splits.check_fractions((0.8, 0.1, 0.2))
  with pytest.raises(ValueError, match="3 positive"):
    splits.check_fractions((0.9, 0.1))
