"""ISIC 2019: dermoscopic images, 8 diagnostic classes (UNK is never positive in training).

Scored with macro recall. When the metadata CSV is present its fields are stored with each
image, and images of one lesion (`lesion_id`) are kept in one split so that no lesion is
seen in training and scored in test (`group_by_lesion`). There is no official labelled
test split.
"""
import logging
import math
import os

import numpy as np
import tensorflow_datasets as tfds

from mfjax.data import common

NAME = "isic2019"
CLASS_NAMES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
LAYOUT = f"""\
<manual_dir>/
  {GROUND_TRUTH}        columns image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC[, UNK] (one-hot)
  {METADATA}            optional: image, age_approx, anatom_site_general, lesion_id, sex
  ISIC_2019_Training_Input/<image>.jpg"""
DEFAULTS = {"group_by_lesion": True}


def spec(opts):
  del opts
  return common.Spec(NAME, CLASS_NAMES, multi_label=False, headline_metric="macro_recall",
                     mean=(0.66776717, 0.52960888, 0.52434725),
                     std=(0.22381877, 0.20363036, 0.21538623), channels=3)


def check(opts, manual_dir):
  del manual_dir
  if opts["split"] == "official":
    raise common.DataError("isic2019 has no official labelled test split; use split='seeded'")
  if not isinstance(opts["group_by_lesion"], bool):
    raise common.DataError(f"isic2019: group_by_lesion={opts['group_by_lesion']!r} must be True or False")


def describe(opts):
  return "" if opts["group_by_lesion"] else "ungrouped"


def features(opts):
  del opts
  return {"age_approx": tfds.features.Scalar(dtype=np.float32), "anatom_site": tfds.features.Text(),
          "lesion_id": tfds.features.Text(), "sex": tfds.features.Text()}


def _flag(path, line, column, value):
  try:
    v = float(value)
  except ValueError:
    v = None
  if v not in (0.0, 1.0):
    raise common.DataError(f"{common.where(path, line, column)}: unknown label value {value!r}; "
                           "expected 0 or 1")
  return v == 1.0


def _read_metadata(path):
  _, table = common.read_csv(path, ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"])
  metadata = {}
  for line, r in table:
    age = math.nan
    if r["age_approx"]:
      try:
        age = float(r["age_approx"])
      except ValueError:
        raise common.DataError(f"{common.where(path, line, 'age_approx')}: {r['age_approx']!r} is not "
                               "a number") from None
    metadata[r["image"]] = {"age_approx": age, "anatom_site": r["anatom_site_general"],
                            "lesion_id": r["lesion_id"], "sex": r["sex"]}
  return metadata


def _ground_truth(manual_dir):
  return common.find_file(manual_dir, [GROUND_TRUTH], f"ISIC 2019 {GROUND_TRUTH}", LAYOUT)


def source_dir(manual_dir, opts):
  del opts
  return os.path.dirname(_ground_truth(manual_dir))


def read(manual_dir, opts):
  csv_path = _ground_truth(manual_dir)
  root = os.path.dirname(csv_path)
  header, table = common.read_csv(csv_path, ("image",) + CLASS_NAMES)
  extra = [c for c in header if c not in ("image", "UNK") + CLASS_NAMES]
  if extra:
    raise common.DataError(f"{csv_path}: unexpected column(s) {extra}; expected image, "
                           f"{', '.join(CLASS_NAMES)}, UNK")
  sources = [csv_path, os.path.join(root, METADATA)]  # the metadata recorded as absent when it is
  metadata = {}
  if os.path.isfile(sources[-1]):
    metadata = _read_metadata(sources[-1])
  elif opts["group_by_lesion"]:
    logging.getLogger("mfjax").warning("isic2019: no %s beside %s: images of one lesion cannot be kept in one "
                                       "split (put it there and build again, or build with group_by_lesion=False)",
                                       METADATA, csv_path)
  rows = []
  for line, r in table:
    positive = [c for c in CLASS_NAMES if _flag(csv_path, line, c, r[c])]
    if "UNK" in r and _flag(csv_path, line, "UNK", r["UNK"]):
      raise common.DataError(f"{common.where(csv_path, line, 'UNK')}: UNK is positive; the 2019 training "
                             "set has no UNK images, so this label is not one of the 8 classes")
    if len(positive) != 1:
      raise common.DataError(f"{common.where(csv_path, line)}: {len(positive)} positive classes "
                             f"{positive}; exactly one of {list(CLASS_NAMES)} must be 1")
    meta = metadata.get(r["image"], {"age_approx": math.nan, "anatom_site": "", "lesion_id": "", "sex": ""})
    group = meta["lesion_id"] if opts["group_by_lesion"] and meta["lesion_id"] else None
    rows.append(common.Row(
        id=r["image"], image=os.path.join(root, "ISIC_2019_Training_Input", r["image"] + ".jpg"),
        where=common.where(csv_path, line, "image"), label=CLASS_NAMES.index(positive[0]),
        group=None if group is None else f"lesion:{group}", features=meta))
  return rows, sources
