"""Classification metrics in NumPy, equal to scikit-learn's to float rounding.

The benchmark scores each dataset with one headline metric (its `mfjax.data` Spec's
`headline_metric`):
  aptos2019  quadratic-weighted Cohen kappa on argmax predictions
  isic2019   macro recall (mean per-class recall) on argmax predictions
  cbis_ddsm  binary ROC-AUC on the positive-class score (3-class list task: macro recall)
  chexpert   mean per-label ROC-AUC over the 14 observations

Undefined values are NaN, never a made-up number: an AUC needs both classes, so a label
with no positives (or no negatives) in the evaluated split has no AUC. `mean_roc_auc`
averages the labels that have one and reports how many did not; the paper's code scored
such a label 0.5 instead.

`evaluate` is what a trainer calls: logits in, every metric that applies out, plus the
headline under the key "headline".
"""
import numpy as np

MULTICLASS_METRICS = ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "quadratic_kappa")
BINARY_METRICS = MULTICLASS_METRICS + ("roc_auc",)
MULTILABEL_METRICS = ("mean_auc",)


def _labels_1d(y, name):
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.equal(np.mod(y, 1), 0)):
      raise ValueError(f"{name} must hold integer class ids, got {y.dtype} with fractional values")
    y = y.astype(np.int64)
  return y


def _pair(y_true, y_pred):
  y_true, y_pred = _labels_1d(y_true, "y_true"), _labels_1d(y_pred, "y_pred")
  if y_true.shape != y_pred.shape:
    raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in length")
  if not y_true.size:
    raise ValueError("no examples to score")
  return y_true, y_pred


def confusion_matrix(y_true, y_pred, labels=None) -> np.ndarray:
  """Counts[i, j] of examples with true labels[i] predicted as labels[j].

  `labels` defaults to the sorted union of the labels seen, as in scikit-learn; a value
  outside an explicit `labels` is an error.
  """
  y_true, y_pred = _pair(y_true, y_pred)
  labels = np.union1d(y_true, y_pred) if labels is None else np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  sorted_labels = labels[order]

  def class_index(y):
    pos = np.minimum(np.searchsorted(sorted_labels, y), len(labels) - 1)
    unknown = np.unique(y[sorted_labels[pos] != y])
    if unknown.size:
      raise ValueError(f"labels {unknown.tolist()} are not among the classes {labels.tolist()}")
    return order[pos]

  ti, pi = class_index(y_true), class_index(y_pred)
  counts = np.zeros((len(labels), len(labels)), np.int64)
  np.add.at(counts, (ti, pi), 1)
  return counts


def accuracy(y_true, y_pred) -> float:
  y_true, y_pred = _pair(y_true, y_pred)
  return float(np.mean(y_true == y_pred))


def balanced_accuracy(y_true, y_pred) -> float:
  """Mean recall over the classes present in y_true (a class only predicted is left out)."""
  counts = confusion_matrix(y_true, y_pred)
  support = counts.sum(axis=1)
  present = support > 0
  return float(np.mean(np.diag(counts)[present] / support[present]))


def macro_recall(y_true, y_pred, labels=None) -> float:
  """Unweighted mean of per-class recall over `labels` (default: union of seen labels).

  A class with no true examples has recall 0/0, counted as 0 as scikit-learn does.
  """
  counts = confusion_matrix(y_true, y_pred, labels)
  support = counts.sum(axis=1)
  recall = np.divide(np.diag(counts), support, out=np.zeros(len(support)), where=support > 0)
  return float(np.mean(recall))


def macro_f1(y_true, y_pred, labels=None) -> float:
  """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN); 0/0 counts as 0."""
  counts = confusion_matrix(y_true, y_pred, labels)
  tp = np.diag(counts).astype(np.float64)
  denominator = counts.sum(axis=0) + counts.sum(axis=1)
  f1 = np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
  return float(np.mean(f1))


def quadratic_kappa(y_true, y_pred, num_classes=None) -> float:
  """Cohen's kappa with quadratic weights (i - j)^2 on class indices.

  With `num_classes`, the classes are 0..num_classes-1 (what the benchmark passes for
  APTOS); otherwise the sorted union of the labels seen. NaN when the expected
  disagreement is zero (e.g. every label and prediction is the same class).
  """
  labels = None if num_classes is None else np.arange(num_classes)
  counts = confusion_matrix(y_true, y_pred, labels).astype(np.float64)
  k = len(counts)
  expected = np.outer(counts.sum(axis=1), counts.sum(axis=0)) / counts.sum()
  weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
  denominator = np.sum(weights * expected)
  if denominator == 0:
    return float("nan")
  return float(1.0 - np.sum(weights * counts) / denominator)


def roc_auc(y_true, scores) -> float:
  """Area under the ROC curve of binary labels {0, 1} ranked by `scores`.

  Tied scores form one ROC point (the trapezoid over them counts as half), exactly as
  scikit-learn's roc_curve + auc. NaN when only one class is present.
  """
  y_true = np.asarray(y_true)
  scores = np.asarray(scores, np.float64)
  if y_true.ndim != 1 or y_true.shape != scores.shape:
    raise ValueError(f"roc_auc needs 1-D labels and scores of one length, got {y_true.shape} "
                     f"and {scores.shape}")
  values = np.unique(y_true)
  if not np.all(np.isin(values, (0, 1))):
    raise ValueError(f"roc_auc needs binary labels in {{0, 1}}, got values {values.tolist()}")
  if np.any(~np.isfinite(scores)):
    raise ValueError("roc_auc got non-finite scores")
  positives = int(np.sum(y_true == 1))
  negatives = len(y_true) - positives
  if positives == 0 or negatives == 0:
    return float("nan")
  order = np.argsort(-scores, kind="mergesort")
  sorted_scores, sorted_true = scores[order], y_true[order] == 1
  last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
  tps = np.cumsum(sorted_true)[last_of_tie]
  fps = last_of_tie + 1 - tps
  tpr = np.r_[0.0, tps / positives]
  fpr = np.r_[0.0, fps / negatives]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def mean_roc_auc(y_true, scores, mask=None):
  """Per-label ROC-AUC of multi-hot labels (N, C); returns (mean, per_label, num_undefined).

  `mask` (N, C), when given, selects which (example, label) pairs count (the
  ignore-uncertain policy). A label whose scored examples lack a positive or a negative
  has an undefined AUC (NaN in `per_label`); `mean` averages the others, and is NaN when
  no label is defined.
  """
  y_true = np.asarray(y_true)
  scores = np.asarray(scores, np.float64)
  if y_true.ndim != 2 or y_true.shape != scores.shape:
    raise ValueError(f"mean_roc_auc needs (N, C) labels and scores, got {y_true.shape} and {scores.shape}")
  if mask is not None:
    mask = np.asarray(mask).astype(bool)
    if mask.shape != y_true.shape:
      raise ValueError(f"mask {mask.shape} does not match labels {y_true.shape}")
  per_label = []
  for j in range(y_true.shape[1]):
    keep = slice(None) if mask is None else mask[:, j]
    per_label.append(roc_auc(y_true[keep, j], scores[keep, j]))
  per_label = np.array(per_label)
  defined = ~np.isnan(per_label)
  mean = float(np.mean(per_label[defined])) if defined.any() else float("nan")
  return mean, per_label, int(np.sum(~defined))


def evaluate(logits, labels, *, multi_label: bool, headline: str, mask=None, valid=None) -> dict:
  """Every metric that applies to these predictions, plus `headline`'s value as "headline".

  logits: (N, C) model outputs. labels: (N,) class ids, or (N, C) multi-hot for multi-label.
  mask: (N, C) multi-label loss/score mask (None = all count). valid: (N,) bool, False for
  the padding rows of an eval loader's last batch; those rows are dropped first.

  Scores are ranked on logits, not on softmax/sigmoid outputs: the ranking is the same,
  but float32 sigmoid saturates to exact ties that would change an AUC. The binary AUC
  uses logit[1] - logit[0], the log-odds of softmax[:, 1].
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  if valid is not None:
    valid = np.asarray(valid).astype(bool)
    logits, labels = logits[valid], labels[valid]
    mask = None if mask is None else np.asarray(mask)[valid]
  if multi_label:
    mean, per_label, undefined = mean_roc_auc(labels, logits, mask)
    result = {"mean_auc": mean, "per_label_auc": per_label.tolist(), "num_undefined_auc": undefined}
  else:
    num_classes = logits.shape[1]
    pred = np.argmax(logits, axis=1)
    result = {
        "accuracy": accuracy(labels, pred),
        "balanced_accuracy": balanced_accuracy(labels, pred),
        "macro_recall": macro_recall(labels, pred),
        "macro_f1": macro_f1(labels, pred),
        "quadratic_kappa": quadratic_kappa(labels, pred, num_classes),
    }
    if num_classes == 2:
      result["roc_auc"] = roc_auc(labels, logits[:, 1] - logits[:, 0])
  if headline not in result:
    raise ValueError(f"headline metric {headline!r} is not computed for "
                     f"{'multi-label' if multi_label else 'multi-class'} data; have {sorted(result)}")
  result["headline"] = result[headline]
  result["num_examples"] = int(len(labels))
  return result
