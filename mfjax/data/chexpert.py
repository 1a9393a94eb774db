"""CheXpert: chest radiographs, 14 observations, multi-label, with uncertainty labels.

Each observation is stored as its raw code: 1 positive, 0 negative, -1 uncertain, -2 blank
(not mentioned). The uncertainty policy is chosen when loading (`pipeline.label_policy`):
U-Zeros (the paper), U-Ones, or ignore-in-loss, so one build serves all three. Splits are
by patient: no patient has images in two splits. The paper used train.csv only (seeded
80/10/10, the default); split='official' keeps the official valid.csv as the test split
and splits train.csv into train/validation by patient. `views` filters by view position.
Grayscale; scored with the mean per-label ROC-AUC.
"""
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mfjax.data import common

NAME = "chexpert"
OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices")
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + OBSERVATIONS
BLANK = -2
VIEWS = ("all", "frontal", "lateral", "ap", "pa")
LAYOUT = """\
<manual_dir>/
  CheXpert-v1.0-small/         (or CheXpert-v1.0/, the full-resolution release)
    train.csv                  Path, Sex, Age, Frontal/Lateral, AP/PA, 14 observations (1, 0, -1, blank)
    valid.csv                  same columns; used by split='official'
    train/patient00001/study1/view1_frontal.jpg ...
    valid/patient64541/study1/view1_frontal.jpg ..."""
DEFAULTS = {"views": "all"}
_CODES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": BLANK}


def spec(opts):
  del opts
  return common.Spec(NAME, OBSERVATIONS, multi_label=True, headline_metric="mean_auc",
                     mean=(0.503,), std=(0.292,), channels=1)


def check(opts, manual_dir):
  del manual_dir
  if opts["views"] not in VIEWS:
    raise common.DataError(f"chexpert: views={opts['views']!r}; valid values are {list(VIEWS)}")


def describe(opts):
  return opts["views"]


def features(opts):
  del opts
  return {"sex": tfds.features.Text(), "age": tfds.features.Scalar(dtype=np.int32),
          "view": tfds.features.Text(), "ap_pa": tfds.features.Text(),
          "patient": tfds.features.Text(), "study": tfds.features.Text()}


def _keep(view: str, ap_pa: str, views: str) -> bool:
  return {"all": True, "frontal": view == "Frontal", "lateral": view == "Lateral",
          "ap": ap_pa == "AP", "pa": ap_pa == "PA"}[views]


def _read(csv_path, official, views):
  _, table = common.read_csv(csv_path, COLUMNS)
  csv_dir = os.path.dirname(csv_path)
  rows = []
  for line, r in table:
    path = r["Path"].replace("\\", "/")
    parts = path.split("/")
    if not path or not parts[-1]:
      raise common.DataError(f"{common.where(csv_path, line, 'Path')}: empty image path")
    if r["Frontal/Lateral"] not in ("Frontal", "Lateral"):
      raise common.DataError(f"{common.where(csv_path, line, 'Frontal/Lateral')}: unknown value "
                             f"{r['Frontal/Lateral']!r}; expected Frontal or Lateral")
    if not _keep(r["Frontal/Lateral"], r["AP/PA"], views):
      continue
    patient = next((p for p in parts if re.fullmatch(r"patient\d+", p)), None)
    if patient is None:
      raise common.DataError(f"{common.where(csv_path, line, 'Path')}: no 'patientNNNNN' folder in "
                             f"{path!r}; the patient is needed to keep patients out of two splits")
    study = next((p for p in parts if re.fullmatch(r"study\d+", p)), "")
    codes = []
    for obs in OBSERVATIONS:
      if r[obs] not in _CODES:
        raise common.DataError(f"{common.where(csv_path, line, obs)}: unknown label value {r[obs]!r}; "
                               "expected 1, 0, -1 or blank")
      codes.append(_CODES[r[obs]])
    try:
      age = int(float(r["Age"])) if r["Age"] else -1
    except (ValueError, OverflowError):  # OverflowError: inf
      raise common.DataError(f"{common.where(csv_path, line, 'Age')}: {r['Age']!r} is not a number") from None
    # Paths start with the release folder ("CheXpert-v1.0-small/train/..."): the CSV's folder,
    # whatever it is called now.
    image = os.path.join(csv_dir, *(parts[1:] if parts[0].startswith("CheXpert-v1.0") else parts))
    rows.append(common.Row(
        id=path, image=image, where=common.where(csv_path, line, "Path"),
        labels=np.array(codes, np.int8), group=f"patient:{patient}", official=official,
        features={"sex": r["Sex"], "age": age, "view": r["Frontal/Lateral"], "ap_pa": r["AP/PA"],
                  "patient": patient, "study": study}))
  return rows


def _train_csv(manual_dir):
  releases = ["CheXpert-v1.0-small", "CheXpert-v1.0", "."]
  return common.find_file(manual_dir, [os.path.normpath(f"{d}/train.csv") for d in releases],
                          "CheXpert train.csv", LAYOUT, ["Path"])


def source_dir(manual_dir, opts):
  del opts
  return os.path.dirname(_train_csv(manual_dir))


def read(manual_dir, opts):
  train_csv = _train_csv(manual_dir)
  rows = _read(train_csv, None, opts["views"])
  sources = [train_csv]
  if opts["split"] == "official":
    valid_csv = os.path.join(os.path.dirname(train_csv), "valid.csv")
    if not os.path.isfile(valid_csv):
      raise common.DataError(f"split='official' needs {valid_csv} (the official validation set, used "
                             f"as the test split). Expected layout:\n{LAYOUT}")
    rows += _read(valid_csv, "test", opts["views"])
    sources.append(valid_csv)
  return rows, sources
