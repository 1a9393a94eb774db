"""Seeded, stratified, group-aware train/validation/test splits.

One algorithm serves every dataset. Examples are gathered into groups (a CheXpert
patient, an ISIC lesion, a CBIS-DDSM patient; otherwise each example alone), and a whole
group always lands in one split, so nothing leaks between splits. Each group gets a
stratum: the rarest label among its positives (for a multi-class dataset, its class).
Groups are shuffled with the seed, ordered by stratum, and dealt one by one to the split
that is furthest below its target share of the examples dealt so far. Walking each
stratum in turn this way gives every split its share of every stratum to within two
examples (of singleton groups), and the totals to within one group.

The result depends only on (group ids, label counts, fractions, seed), never on the
order of the rows in the source files.
"""
import numpy as np

SPLITS = ("train", "validation", "test")


def check_fractions(fractions) -> tuple[float, ...]:
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != len(SPLITS) or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(f"split fractions must be {len(SPLITS)} positive numbers summing to 1 "
                     f"(train, validation, test), got {fractions}")
  return fractions


def assign(groups, label_counts, fractions, seed: int) -> np.ndarray:
  """Split index (0 train, 1 validation, 2 test, or into `fractions`) of each example.

  groups: (N,) hashable group id per example.
  label_counts: (N, C) non-negative counts, one-hot for multi-class, multi-hot for multi-label.
  fractions: target share of the examples per split (any length ≥ 1, positive, sum 1).
  """
  fractions = np.asarray(fractions, np.float64)
  label_counts = np.asarray(label_counts)
  groups = np.asarray([str(g) for g in groups])
  if label_counts.ndim != 2 or len(label_counts) != len(groups):
    raise ValueError(f"label_counts must be (N, C) with N = {len(groups)} groups entries, "
                     f"got {label_counts.shape}")
  group_ids, group_of_example = np.unique(groups, return_inverse=True)
  num_groups = len(group_ids)
  group_labels = np.zeros((num_groups, label_counts.shape[1]), np.int64)
  np.add.at(group_labels, group_of_example, label_counts > 0)
  group_sizes = np.bincount(group_of_example, minlength=num_groups)

  # Stratum of a group: its rarest positive label (ties: the lower index); none: after all.
  frequency = np.maximum(group_labels.sum(axis=0), 0)
  rarity_rank = np.empty(len(frequency), np.int64)
  rarity_rank[np.lexsort((np.arange(len(frequency)), frequency))] = np.arange(len(frequency))
  ranks = np.where(group_labels > 0, rarity_rank[None, :], len(frequency))
  stratum = ranks.min(axis=1)

  rng = np.random.default_rng(seed)
  order = rng.permutation(num_groups)
  order = order[np.argsort(stratum[order], kind="stable")]

  split_of_group = np.empty(num_groups, np.int64)
  dealt = np.zeros(len(fractions))
  total = 0
  for g in order:
    total += group_sizes[g]
    target = int(np.argmax(fractions * total - dealt))
    split_of_group[g] = target
    dealt[target] += group_sizes[g]
  return split_of_group[group_of_example]
