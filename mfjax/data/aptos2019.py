"""APTOS 2019 Blindness Detection: colour fundus photographs, diabetic-retinopathy grade 0-4.

Scored with the quadratic-weighted Cohen kappa. The paper splits 70/15/15 (the default
here, stratified by grade); the labelled release has no official test split.
"""
import os

from mfjax.data import common

NAME = "aptos2019"
CLASS_NAMES = ("no_dr", "mild", "moderate", "severe", "proliferative_dr")
COLUMNS = ["id_code", "diagnosis"]
LAYOUT = """\
<manual_dir>/                  the Kaggle download, unpacked (or its parent folder)
  train.csv                    columns id_code, diagnosis (0-4)
  train_images/<id_code>.png"""
DEFAULTS = {"fractions": (0.7, 0.15, 0.15)}


def spec(opts):
  del opts
  return common.Spec(NAME, CLASS_NAMES, multi_label=False, headline_metric="quadratic_kappa",
                     mean=(0.415, 0.221, 0.073), std=(0.275, 0.150, 0.081), channels=3)


def check(opts, manual_dir):
  del manual_dir
  if opts["split"] == "official":
    raise common.DataError("aptos2019 has no official split (the Kaggle test labels are not public); "
                           "use split='seeded'")


def describe(opts):
  del opts
  return ""


def features(opts):
  del opts
  return {}


def _train_csv(manual_dir):
  return common.find_file(manual_dir, ["train.csv"], "APTOS 2019 train.csv", LAYOUT, COLUMNS)


def source_dir(manual_dir, opts):
  del opts
  return os.path.dirname(_train_csv(manual_dir))


def read(manual_dir, opts):
  del opts
  csv_path = _train_csv(manual_dir)
  root = os.path.dirname(csv_path)
  _, table = common.read_csv(csv_path, COLUMNS)
  rows = []
  for line, r in table:
    try:
      grade = int(float(r["diagnosis"]))
      if grade != float(r["diagnosis"]) or not 0 <= grade < len(CLASS_NAMES):
        raise ValueError
    except (ValueError, OverflowError):  # OverflowError: inf
      raise common.DataError(f"{common.where(csv_path, line, 'diagnosis')}: unknown label "
                             f"{r['diagnosis']!r}; expected an integer grade 0-4") from None
    if not r["id_code"]:
      raise common.DataError(f"{common.where(csv_path, line, 'id_code')}: empty id_code")
    rows.append(common.Row(id=r["id_code"], image=os.path.join(root, "train_images", r["id_code"] + ".png"),
                           where=common.where(csv_path, line, "id_code"), label=grade))
  return rows, [csv_path]
