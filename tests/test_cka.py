"""Linear CKA against the textbook formula; the minibatch (unbiased HSIC) estimator; invariances."""
import json

import numpy as np
import pytest

from mfjax.evals import cka
from mfjax.report import results as report_results


def direct_cka(x, y):
  """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H) / (n-1)^2, H = I - 11'/n."""
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = x @ x.T, y @ y.T

  def hsic(a, b):
    return np.trace(a @ h @ b @ h) / (n - 1) ** 2

  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def u_centred(gram):
  """Székely & Rizzo's U-centring; <U(K), U(L)> / (n(n-3)) is the unbiased HSIC, derived differently."""
  n = len(gram)
  g = gram - np.diag(np.diag(gram))
  rows = g.sum(axis=1)
  u = g - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + g.sum() / ((n - 1) * (n - 2))
  return u - np.diag(np.diag(u))


def direct_unbiased_cka(x, y):
  n = len(x)
  k, l = u_centred(x @ x.T), u_centred(y @ y.T)
  return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)) if n > 3 else np.nan


def related(rng, n, p, q):
  x = rng.normal(size=(n, p))
  return x, np.tanh(x @ rng.normal(size=(p, q)) / np.sqrt(p)) + 0.5 * rng.normal(size=(n, q))


@pytest.mark.parametrize("n, p, q", [(60, 8, 12), (10, 40, 30)])  # feature path and Gram path
def test_linear_cka_equals_direct_formula(n, p, q):
  rng = np.random.default_rng(n)
  x, y = related(rng, n, p, q)
  assert cka.linear_cka(x, y) == pytest.approx(direct_cka(x, y), rel=1e-10)
  assert cka.linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
  assert cka.linear_cka(x, y) == pytest.approx(cka.linear_cka(y, x), rel=1e-12)


def test_invariances_and_what_is_not_invariant():
  rng = np.random.default_rng(0)
  x, y = related(rng, 80, 10, 6)
  q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
  reference = cka.linear_cka(x, y)
  assert 0.1 < reference < 0.9
  assert cka.linear_cka(3.7 * x, y) == pytest.approx(reference, rel=1e-12)
  assert cka.linear_cka(x @ q, y) == pytest.approx(reference, rel=1e-10)
  assert cka.linear_cka(x + 5.0, y) == pytest.approx(reference, rel=1e-10)  # centring removes offsets
  stretched = x @ np.diag(np.linspace(0.1, 10, 10))
  assert abs(cka.linear_cka(stretched, y) - reference) > 0.01  # an anisotropic map does change CKA

  batches = [slice(i, i + 20) for i in range(0, 80, 20)]

  def minibatch(a, b):
    m = cka.MinibatchCKA()
    for s in batches:
      m.update([a[s]], [b[s]])
    return m.result()[0, 0]

  reference = minibatch(x, y)
  assert minibatch(0.01 * x, y) == pytest.approx(reference, rel=1e-10)
  assert minibatch(x @ q, y) == pytest.approx(reference, rel=1e-10)
  assert minibatch(x, 42 * y) == pytest.approx(reference, rel=1e-10)
  # ViT blocks carry a few channels with huge constant offsets; uncentred Gram matrices gave NaN or -0.5 off.
  outliers = np.zeros(10)
  outliers[:3] = 1e4
  assert minibatch(x + 1e3, y) == pytest.approx(reference, rel=1e-9)
  assert minibatch(x + outliers, y + 1e4) == pytest.approx(reference, rel=1e-9)


def test_unbiased_hsic_equals_u_centred_form():
  rng = np.random.default_rng(1)
  x, y = related(rng, 30, 5, 7)
  k, l = x @ x.T, y @ y.T
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  hsic = cka.unbiased_hsic(k[None], l[None])[0, 0]
  assert hsic == pytest.approx(np.sum(u_centred(x @ x.T) * u_centred(y @ y.T)) / (30 * 27), rel=1e-10)
  one_batch = cka.MinibatchCKA()
  one_batch.update([x], [y])
  assert one_batch.result()[0, 0] == pytest.approx(direct_unbiased_cka(x, y), rel=1e-10)


def test_minibatch_estimate_converges_to_the_full_cka():
  rng = np.random.default_rng(2)
  errors = []
  for n in (1024, 16384):
    x, y = related(rng, n, 64, 32)
    m = cka.MinibatchCKA()
    for start in range(0, n, 512):
      m.update([x[start:start + 512]], [y[start:start + 512]])
    assert m.num_batches == n // 512 and m.num_examples == n
    errors.append(abs(m.result()[0, 0] - cka.linear_cka(x, y)))
  assert errors[1] < errors[0] and errors[1] < 0.003


def test_layer_matrix_matches_pairwise_and_self_comparison_is_symmetric():
  rng = np.random.default_rng(3)
  layers_a = [rng.normal(size=(40, d)) for d in (4, 8, 16)]
  layers_b = [layers_a[1] @ rng.normal(size=(8, 5)) + rng.normal(size=(40, 5)), rng.normal(size=(40, 3))]
  m = cka.MinibatchCKA()
  for s in (slice(0, 24), slice(24, 40)):  # batches of different sizes
    m.update([a[s] for a in layers_a], [b[s] for b in layers_b])
  matrix = m.result()
  assert matrix.shape == (3, 2)
  for i, a in enumerate(layers_a):
    for j, b in enumerate(layers_b):
      pair = cka.MinibatchCKA()
      for s in (slice(0, 24), slice(24, 40)):
        pair.update([a[s]], [b[s]])
      assert matrix[i, j] == pytest.approx(pair.result()[0, 0], rel=1e-10)
  assert matrix[1, 0] > 0.5 > matrix[1, 1]
  self_similarity = cka.MinibatchCKA()
  self_similarity.update(layers_a)
  result = self_similarity.result()
  np.testing.assert_allclose(result, result.T, rtol=1e-12)
  np.testing.assert_allclose(np.diag(result), 1.0, rtol=1e-12)


def test_constant_representation_is_undefined_not_made_up():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(12, 3))
  assert np.isnan(cka.linear_cka(np.ones((12, 3)), x))
  m = cka.MinibatchCKA()
  m.update([np.ones((12, 3)), x], [x])
  assert np.isnan(m.result()[0, 0]) and m.result()[1, 0] == pytest.approx(1.0)


def test_pool_tokens():
  tokens = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
  np.testing.assert_array_equal(cka.pool_tokens(tokens), tokens.mean(axis=1))
  feature_map = np.arange(2 * 2 * 3 * 4, dtype=float).reshape(2, 2, 3, 4)
  np.testing.assert_array_equal(cka.pool_tokens(feature_map), feature_map.mean(axis=(1, 2)))
  np.testing.assert_array_equal(cka.pool_tokens(tokens[:, 0]), tokens[:, 0])


@pytest.mark.parametrize("update, message", [
    (lambda m: m.update([np.ones((3, 2))]), "at least 4 examples"),
    (lambda m: m.update([np.ones((6, 2)), np.ones((5, 2))]), r"layers of feats_a have different batch sizes \[5, 6\]"),
    (lambda m: m.update([np.ones((6, 2))], [np.ones((5, 2))]), "feats_a has 6 examples per layer, feats_b has 5"),
    (lambda m: m.update([np.ones((6, 4, 2))]), r"feats_a\[0\] must be \(examples, features\).*pool_tokens"),
    (lambda m: m.update([np.full((6, 2), np.nan)]), r"feats_a\[0\] has non-finite values"),
    (lambda m: m.result(), "no minibatch was added"),
])
def test_bad_input_is_named(update, message):
  with pytest.raises(ValueError, match=message):
    update(cka.MinibatchCKA())


def test_layer_count_cannot_change_between_updates():
  m = cka.MinibatchCKA()
  m.update([np.random.default_rng(0).normal(size=(6, 2))] * 2)
  with pytest.raises(ValueError, match="holds 2 x 2 layers, the update has 1 x 1"):
    m.update([np.ones((6, 2))])


def test_result_json_is_what_the_report_reads(tmp_path):
  matrix = np.array([[1.0, 0.5], [np.nan, 0.25]])
  data = cka.result_json("layers", ["block 0", "block 1"], ["block 0", "block 1"], matrix, model="dinov2_vitb14",
                         dataset="isic2019")
  path = tmp_path / "run" / "cka_dinov2.json"
  path.parent.mkdir()
  path.write_text(json.dumps(data))  # NaN is written as null: strict JSON
  assert "NaN" not in path.read_text()
  (read,) = report_results.load_cka(str(tmp_path))
  np.testing.assert_array_equal(read["matrix"], matrix)
  assert (read["kind"], read["name"], read["model"]) == ("layers", "dinov2", "dinov2_vitb14")
  with pytest.raises(ValueError, match="kind 'heatmap'"):
    cka.result_json("heatmap", ["a"], ["b"], [[1.0]])
  with pytest.raises(ValueError, match=r"matrix \(2, 2\) does not match 1 row and 2 column labels"):
    cka.result_json("layers", ["a"], ["b", "c"], matrix)
