"""mfjax.evals.metrics against scikit-learn on random inputs: ties, absent classes, edge cases."""
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from mfjax.evals import metrics

TOL = 1e-9


def _random_case(rng, num_classes, n, drop_class=True):
  """Labels and predictions where one class is missing from y_true (and sometimes y_pred)."""
  y_true = rng.integers(0, num_classes, n)
  y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, num_classes, n))
  if drop_class:
    absent = rng.integers(0, num_classes)
    y_true[y_true == absent] = (absent + 1) % num_classes
    if rng.random() < 0.5:
      y_pred[y_pred == absent] = (absent + 1) % num_classes
  return y_true, y_pred


@pytest.mark.parametrize("seed", range(30))
def test_multiclass_metrics_equal_sklearn(seed):
  rng = np.random.default_rng(seed)
  num_classes = int(rng.integers(2, 9))
  y_true, y_pred = _random_case(rng, num_classes, int(rng.integers(5, 300)), drop_class=seed % 3 != 0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns about the absent classes
    ref = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
        "macro_recall": skm.recall_score(y_true, y_pred, average="macro"),
        "macro_recall_all": skm.recall_score(y_true, y_pred, average="macro", labels=range(num_classes),
                                             zero_division=0),
        "macro_f1": skm.f1_score(y_true, y_pred, average="macro"),
        "macro_f1_all": skm.f1_score(y_true, y_pred, average="macro", labels=range(num_classes),
                                     zero_division=0),
        "kappa": skm.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=range(num_classes)),
        "kappa_seen": skm.cohen_kappa_score(y_true, y_pred, weights="quadratic"),
    }
  ours = {
      "accuracy": metrics.accuracy(y_true, y_pred),
      "balanced_accuracy": metrics.balanced_accuracy(y_true, y_pred),
      "macro_recall": metrics.macro_recall(y_true, y_pred),
      "macro_recall_all": metrics.macro_recall(y_true, y_pred, labels=np.arange(num_classes)),
      "macro_f1": metrics.macro_f1(y_true, y_pred),
      "macro_f1_all": metrics.macro_f1(y_true, y_pred, labels=np.arange(num_classes)),
      "kappa": metrics.quadratic_kappa(y_true, y_pred, num_classes),
      "kappa_seen": metrics.quadratic_kappa(y_true, y_pred),
  }
  for key in ref:
    assert abs(ours[key] - ref[key]) <= TOL, (key, ours[key], ref[key])


def test_absent_class_counts_as_sklearn_does():
  # Class 2 is predicted but never true: macro recall counts it as 0, balanced accuracy skips it.
  y_true = np.array([0, 0, 1, 1])
  y_pred = np.array([0, 2, 1, 1])
  assert metrics.macro_recall(y_true, y_pred) == pytest.approx((0.5 + 1 + 0) / 3, abs=TOL)
  assert metrics.balanced_accuracy(y_true, y_pred) == pytest.approx((0.5 + 1) / 2, abs=TOL)


@pytest.mark.parametrize("seed", range(30))
def test_binary_auc_equals_sklearn_with_ties(seed):
  rng = np.random.default_rng(100 + seed)
  n = int(rng.integers(2, 400))
  y_true = rng.integers(0, 2, n)
  y_true[0], y_true[-1] = 0, 1  # both classes present
  # Coarse scores make many ties, within and across classes.
  scores = np.round(rng.normal(size=n) + 0.7 * y_true, int(rng.integers(0, 3)))
  assert abs(metrics.roc_auc(y_true, scores) - skm.roc_auc_score(y_true, scores)) <= TOL


def test_binary_auc_all_tied_is_half_and_one_class_is_undefined():
  assert metrics.roc_auc([0, 1, 0, 1], [3.0, 3.0, 3.0, 3.0]) == 0.5
  assert np.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
  with pytest.raises(ValueError, match="binary labels"):
    metrics.roc_auc([0, 2], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(10))
def test_mean_auc_equals_sklearn_and_reports_undefined(seed):
  rng = np.random.default_rng(200 + seed)
  n, c = 120, 14
  y_true = (rng.random((n, c)) < rng.uniform(0.05, 0.6, c)).astype(int)
  y_true[:, 3] = 0  # a label with no positives in this split
  scores = np.round(rng.normal(size=(n, c)) + y_true, 1)
  mean, per_label, undefined = metrics.mean_roc_auc(y_true, scores)
  defined = [j for j in range(c) if 0 < y_true[:, j].sum() < n]
  ref = [skm.roc_auc_score(y_true[:, j], scores[:, j]) for j in defined]
  assert undefined == c - len(defined) >= 1
  assert np.isnan(per_label[3])
  np.testing.assert_allclose(per_label[defined], ref, atol=TOL, rtol=0)
  assert abs(mean - np.mean(ref)) <= TOL
  # With every label defined it is scikit-learn's macro average.
  full = np.delete(np.arange(c), [j for j in range(c) if j not in defined])
  assert abs(metrics.mean_roc_auc(y_true[:, full], scores[:, full])[0]
             - skm.roc_auc_score(y_true[:, full], scores[:, full], average="macro")) <= TOL


def test_mean_auc_mask_excludes_pairs():
  rng = np.random.default_rng(7)
  y_true = rng.integers(0, 2, (50, 3))
  scores = rng.normal(size=(50, 3))
  mask = rng.random((50, 3)) < 0.7
  _, per_label, _ = metrics.mean_roc_auc(y_true, scores, mask)
  for j in range(3):
    keep = mask[:, j]
    assert abs(per_label[j] - skm.roc_auc_score(y_true[keep, j], scores[keep, j])) <= TOL


def test_evaluate_uses_headline_and_drops_padding():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(40, 5))
  labels = rng.integers(0, 5, 40)
  valid = np.arange(40) < 33
  out = metrics.evaluate(logits, labels, multi_label=False, headline="quadratic_kappa", valid=valid)
  pred = logits[:33].argmax(1)
  assert out["num_examples"] == 33
  assert abs(out["headline"] - skm.cohen_kappa_score(labels[:33], pred, weights="quadratic",
                                                     labels=range(5))) <= TOL
  binary = metrics.evaluate(logits[:, :2], labels % 2, multi_label=False, headline="roc_auc")
  softmax_pos = np.exp(logits[:, 1]) / np.exp(logits[:, :2]).sum(1)
  assert abs(binary["headline"] - skm.roc_auc_score(labels % 2, softmax_pos)) <= TOL
  with pytest.raises(ValueError, match="mean_auc"):
    metrics.evaluate(logits, labels, multi_label=False, headline="mean_auc")


def test_metric_input_errors():
  with pytest.raises(ValueError, match="differ in length"):
    metrics.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match=r"labels \[7\] are not among"):
    metrics.quadratic_kappa([0, 7], [0, 1], num_classes=5)
