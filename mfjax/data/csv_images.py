"""Your own dataset: one CSV naming an image and its label(s) per row.

Multi-class: `label_column` holds a class name (or number) per row; the classes are
`class_names` in that order, or the sorted distinct values when not given (a value outside
given `class_names` is an error). Multi-label: `label_columns` lists one 0/1 column per
label. Optional columns: `split_column` (train / validation / test; given with
split='official', which needs it; blank rows are split by seed into the splits the column never names, and are an
error when it names all three), `group_column` (rows of one group, e.g. a
patient, never straddle splits). Image paths are relative to `image_root` (default: the
CSV's folder) or absolute. Normalization defaults to the mean/std measured on the training
split at build time.
"""
import collections
import logging
import os

import numpy as np

from mfjax.data import common

NAME = "csv_images"
RARE_CLASS = 3  # inferred classes with fewer rows are warned about
LAYOUT = """\
<manual_dir>/
  labels.csv                   image,label[,split][,group]   (any names, set by options)
  <any folders>/<image files>  paths in the CSV are relative to image_root (default: the CSV's folder)"""
DEFAULTS = {
    "csv": None,               # path relative to manual_dir; default: the only *.csv in it
    "image_column": "image",
    "label_column": None,      # multi-class: one column of class names
    "label_columns": None,     # multi-label: one 0/1 column per label
    "class_names": None,
    "split_column": None,
    "group_column": None,
    "image_root": None,
    "channels": 3,
    "headline": None,          # default: roc_auc (2 classes), accuracy (more), mean_auc (multi-label)
    "mean": None,
    "std": None,
}
SPLIT_VALUES = {"train": "train", "validation": "validation", "test": "test", "": None}


def _csv_path(manual_dir, opts):
  if opts["csv"] is not None:
    path = os.path.join(manual_dir, opts["csv"])
    if not os.path.isfile(path):
      raise common.DataError(f"csv_images: csv={opts['csv']!r} does not exist under {manual_dir!r}")
    return path
  found = sorted(f for f in os.listdir(manual_dir) if f.lower().endswith(".csv")) if os.path.isdir(manual_dir) else []
  if len(found) != 1:
    raise common.DataError(f"csv_images: pass csv=<file> (found {len(found)} CSV files in {manual_dir!r}: "
                           f"{found}). Expected layout:\n{LAYOUT}")
  return os.path.join(manual_dir, found[0])


def _sort_key(value):
  try:
    return (0, float(value), value)
  except ValueError:
    return (1, 0.0, value)


def check(opts, manual_dir):
  if (opts["label_column"] is None) == (opts["label_columns"] is None):
    raise common.DataError("csv_images: set exactly one of label_column (multi-class) and "
                           "label_columns (multi-label)")
  if opts["channels"] not in (1, 3):
    raise common.DataError(f"csv_images: channels={opts['channels']!r} must be 1 or 3")
  if opts["split_column"] is not None and opts["split"] != "official":
    raise common.DataError(f"csv_images: split_column={opts['split_column']!r} is read only with split='official' "
                           f"(split={opts['split']!r} would ignore it): add split=official, or leave split_column out")
  if opts["split"] == "official" and opts["split_column"] is None:
    raise common.DataError("csv_images: split='official' needs split_column=<the CSV column giving each row's split: "
                           "train, validation, test or blank>; without one, use split='seeded'")
  for key in ("class_names", "label_columns"):  # "A,B" from a command line is two names, not three characters
    if isinstance(opts[key], str):
      opts[key] = tuple(name.strip() for name in opts[key].split(","))
  for key in ("mean", "std"):
    if isinstance(opts[key], (int, float)):
      opts[key] = (opts[key],)
    if isinstance(opts[key], str):
      opts[key] = tuple(opts[key].split(","))
    if opts[key] is not None:
      try:
        opts[key] = tuple(float(v) for v in opts[key])
      except (TypeError, ValueError):
        raise common.DataError(f"csv_images: {key}={opts[key]!r} must be {opts['channels']} number(s)") from None
      if len(opts[key]) != opts["channels"]:
        raise common.DataError(f"csv_images: {key}={opts[key]} needs {opts['channels']} value(s)")
  opts["csv"] = os.path.relpath(_csv_path(manual_dir, opts), manual_dir)
  if opts["label_columns"] is not None:
    opts["label_columns"] = tuple(opts["label_columns"])
    if len(opts["label_columns"]) < 1 or len(set(opts["label_columns"])) != len(opts["label_columns"]):
      raise common.DataError(f"csv_images: label_columns={opts['label_columns']} must be distinct names")
    if opts["class_names"] is not None:
      raise common.DataError("csv_images: class_names is for label_column; with label_columns the "
                             "labels are the column names")
  elif opts["class_names"] is None:
    path = os.path.join(manual_dir, opts["csv"])
    _, table = common.read_csv(path, [opts["label_column"]])
    for line, r in table:
      if not r[opts["label_column"]]:
        raise common.DataError(f"{common.where(path, line, opts['label_column'])}: empty label; every row "
                               "needs a class (leave the row out, or name its class)")
    opts["class_names"] = tuple(sorted({r[opts["label_column"]] for _, r in table}, key=_sort_key))
    counts = collections.Counter(r[opts["label_column"]] for _, r in table)
    rare = sorted((name for name, n in counts.items() if n < RARE_CLASS), key=_sort_key)
    if rare:  # a typo in one cell makes a class of its own
      logging.getLogger("mfjax").warning(
          "csv_images: %s: class(es) with fewer than %d rows: %s. A misspelt label makes a class of its own; "
          "name the classes (class_names=...) to have any other value refused", path, RARE_CLASS,
          ", ".join(f"{name!r} ({counts[name]})" for name in rare))
  else:
    opts["class_names"] = tuple(str(c) for c in opts["class_names"])
    if any(not name.strip() for name in opts["class_names"]):
      raise common.DataError(f"csv_images: class_names={opts['class_names']} has an empty name")
  num = len(opts["label_columns"] or opts["class_names"])
  if num < 2 and opts["label_columns"] is None:
    raise common.DataError(f"csv_images: {num} class(es) {opts['class_names']}; a classifier needs at least 2")
  valid = ("mean_auc",) if opts["label_columns"] else (
      ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "quadratic_kappa")
      + (("roc_auc",) if num == 2 else ()))
  if opts["headline"] is None:
    opts["headline"] = "mean_auc" if opts["label_columns"] else ("roc_auc" if num == 2 else "accuracy")
  if opts["headline"] not in valid:
    raise common.DataError(f"csv_images: headline={opts['headline']!r}; valid values here are {list(valid)}")


def spec(opts):
  names = opts["label_columns"] or opts["class_names"]
  return common.Spec(NAME, tuple(names), multi_label=opts["label_columns"] is not None,
                     headline_metric=opts["headline"], mean=opts["mean"], std=opts["std"],
                     channels=opts["channels"])


def source_dir(manual_dir, opts):
  del opts
  return manual_dir


def describe(opts):
  return os.path.splitext(os.path.basename(opts["csv"]))[0]


def features(opts):
  del opts
  return {}


def read(manual_dir, opts):
  path = os.path.join(manual_dir, opts["csv"])
  image_col = opts["image_column"]
  required = [image_col] + list(opts["label_columns"] or [opts["label_column"]])
  required += [c for c in (opts["split_column"], opts["group_column"]) if c]
  _, table = common.read_csv(path, required)
  root = os.path.join(manual_dir, opts["image_root"]) if opts["image_root"] else os.path.dirname(path)
  rows = []
  for line, r in table:
    if not r[image_col]:
      raise common.DataError(f"{common.where(path, line, image_col)}: empty image path")
    row = common.Row(id=r[image_col], image=os.path.join(root, r[image_col]),
                     where=common.where(path, line, image_col))
    if opts["label_columns"]:
      codes = []
      for c in opts["label_columns"]:
        if r[c] not in ("0", "1", "0.0", "1.0"):
          raise common.DataError(f"{common.where(path, line, c)}: unknown label value {r[c]!r}; expected 0 or 1")
        codes.append(int(float(r[c])))
      row.labels = np.array(codes, np.int8)
    else:
      value = r[opts["label_column"]]
      if value not in opts["class_names"]:
        raise common.DataError(f"{common.where(path, line, opts['label_column'])}: unknown label value "
                               f"{value!r}; the classes are {list(opts['class_names'])}")
      row.label = opts["class_names"].index(value)
    if opts["split_column"]:
      value = r[opts["split_column"]].lower()
      if value not in SPLIT_VALUES:
        raise common.DataError(f"{common.where(path, line, opts['split_column'])}: unknown split {value!r}; "
                               "expected train, validation, test or blank")
      row.official = SPLIT_VALUES[value]
    if opts["group_column"]:
      row.group = f"group:{r[opts['group_column']]}" if r[opts["group_column"]] else None
    rows.append(row)
  if opts["split_column"] and all(row.official is None for row in rows):
    raise common.DataError(f"{path}: column {opts['split_column']!r} (split_column) is blank in every row; give "
                           "rows a split (train, validation or test), or use split='seeded' without split_column")
  return rows, [path]
