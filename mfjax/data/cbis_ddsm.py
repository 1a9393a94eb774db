"""CBIS-DDSM mammograms (grayscale), two layouts.

layout='cbis' (default): the official TCIA release. The four case-description CSVs list one
row per abnormality; rows of one full mammogram (the first folder of `image file path`,
e.g. Mass-Training_P_00001_LEFT_CC) form one example. task='benign_malignant' (default):
malignant when any of its abnormalities is MALIGNANT, BENIGN and BENIGN_WITHOUT_CALLBACK
are benign; `abnormality` picks mass, calc or both CSV families. task='mass_calcification':
which CSV family the image comes from (a mammogram in both families is then two examples;
for benign/malignant it is one). The image is found by that folder name anywhere
under manual_dir: a converted `<folder>.png`/`.jpg`, or the one file inside `<folder>/`
(PNG/JPEG preferred over DICOM, which is read with pydicom). Patients never straddle
seeded splits; split='official' keeps the official Test CSVs as the test split.

layout='lists': the paper's layout, `{train,val,test}.txt` of image paths whose file name
starts with normal, benign or cancer. task='normal_abnormal' (default, the paper's binary
task) or 'normal_benign_cancer'. split='official' uses the three lists as given.
"""
import collections
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mfjax.data import common

NAME = "cbis_ddsm"
# 1.1.0: a mammogram in both CSV families is one benign/malignant example (1.0.0 builds had it twice).
VERSION = "1.1.0"
CSV_FILES = {  # file -> (abnormality family, official split)
    "mass_case_description_train_set.csv": ("mass", None),
    "mass_case_description_test_set.csv": ("mass", "test"),
    "calc_case_description_train_set.csv": ("calcification", None),
    "calc_case_description_test_set.csv": ("calcification", "test"),
}
CSV_COLUMNS = ("patient_id", "left or right breast", "image view", "pathology", "image file path")
PATHOLOGIES = ("BENIGN_WITHOUT_CALLBACK", "BENIGN", "MALIGNANT")  # increasing severity
TASKS = {
    "cbis": {"benign_malignant": ("benign", "malignant"), "mass_calcification": ("mass", "calcification")},
    "lists": {"normal_abnormal": ("normal", "abnormal"), "normal_benign_cancer": ("normal", "benign", "cancer")},
}
LIST_SPLITS = {"train.txt": "train", "val.txt": "validation", "test.txt": "test"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
LAYOUT = """\
layout='cbis' (official TCIA release):
<manual_dir>/
  mass_case_description_train_set.csv  mass_case_description_test_set.csv
  calc_case_description_train_set.csv  calc_case_description_test_set.csv   (anywhere below)
  CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<study>/<series>/1-1.dcm          (as downloaded), or
  <anywhere>/Mass-Training_P_00001_LEFT_CC.png                              (converted)
layout='lists' (the paper's):
<manual_dir>/
  ddsm_raw_image_lists/train.txt val.txt test.txt   one image path per line, relative to ddsm_raw/
  ddsm_raw/<path>                                   file names start with normal, benign or cancer"""
DEFAULTS = {"layout": "cbis", "task": None, "abnormality": "both"}


def spec(opts):
  names = TASKS[opts["layout"]][opts["task"]]
  return common.Spec(NAME, names, multi_label=False,
                     headline_metric="roc_auc" if len(names) == 2 else "macro_recall",
                     mean=(0.286,), std=(0.267,), channels=1)


def check(opts, manual_dir):
  del manual_dir
  if opts["layout"] not in TASKS:
    raise common.DataError(f"cbis_ddsm: layout={opts['layout']!r}; valid values are {list(TASKS)}")
  tasks = TASKS[opts["layout"]]
  if opts["task"] is None:
    opts["task"] = next(iter(tasks))
  if opts["task"] not in tasks:
    raise common.DataError(f"cbis_ddsm: task={opts['task']!r} is not available with layout="
                           f"{opts['layout']!r}; valid tasks are {list(tasks)}")
  if opts["abnormality"] not in ("both", "mass", "calc"):
    raise common.DataError(f"cbis_ddsm: abnormality={opts['abnormality']!r}; valid values are "
                           "'both', 'mass', 'calc'")
  if opts["abnormality"] != "both" and opts["task"] != "benign_malignant":
    raise common.DataError("cbis_ddsm: abnormality= only applies to task='benign_malignant'")


def describe(opts):
  parts = [opts["layout"], opts["task"]]
  if opts["abnormality"] != "both":
    parts.append(opts["abnormality"])
  return "-".join(parts)


def features(opts):
  if opts["layout"] == "lists":
    return {"path": tfds.features.Text()}
  return {"patient": tfds.features.Text(), "breast": tfds.features.Text(), "view": tfds.features.Text(),
          "abnormality": tfds.features.Text(), "pathology": tfds.features.Text(),
          "num_abnormalities": tfds.features.Scalar(dtype=np.int32)}


def source_dir(manual_dir, opts):
  """The lists layout may be given as its parent folder (found one folder down); the official release's
  CSVs and images are searched anywhere below manual_dir."""
  if opts["layout"] != "lists":
    return manual_dir
  lists_dir = os.path.dirname(_first_list(manual_dir))
  return os.path.dirname(lists_dir) if os.path.basename(lists_dir) == "ddsm_raw_image_lists" else lists_dir


def read(manual_dir, opts):
  return _read_lists(manual_dir, opts) if opts["layout"] == "lists" else _read_cbis(manual_dir, opts)


# ----------------------------------------------------------------------------- official release


def _find_csvs(manual_dir, opts):
  wanted = {"both": ("mass", "calcification"), "mass": ("mass",), "calc": ("calcification",)}[opts["abnormality"]]
  found = {}
  for dirpath, dirnames, filenames in os.walk(manual_dir, followlinks=True):
    dirnames.sort()
    depth = os.path.relpath(dirpath, manual_dir).count(os.sep)
    if depth > 2:
      dirnames[:] = []
    for f in sorted(filenames):
      if f in CSV_FILES and CSV_FILES[f][0] in wanted and f not in found:
        found[f] = os.path.join(dirpath, f)
  missing = [f for f, (family, _) in CSV_FILES.items() if family in wanted and f not in found]
  if not found:
    raise common.DataError(f"no CBIS-DDSM case-description CSV ({', '.join(CSV_FILES)}) found under "
                           f"{manual_dir!r}. Expected layout:\n{LAYOUT}")
  if missing:  # a family without its CSVs would be left out of the dataset without a word
    raise common.DataError(f"abnormality={opts['abnormality']!r} needs {', '.join(missing)}, not found under "
                           f"{manual_dir!r} (found: {sorted(found) or 'none'}); add them, or build with "
                           f"abnormality='mass' or 'calc'. Expected layout:\n{LAYOUT}")
  return found


def _index_images(manual_dir):
  """Map a folder or file stem -> image files named by it (directly or anywhere inside)."""
  index = collections.defaultdict(list)
  for dirpath, dirnames, filenames in os.walk(manual_dir, followlinks=True):
    dirnames.sort()
    parts = os.path.relpath(dirpath, manual_dir).split(os.sep)
    for f in sorted(filenames):
      if not f.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(dirpath, f)
      stem = os.path.splitext(f)[0]
      index[stem].append(path)
      for p in set(parts) - {".", stem}:  # CASE/CASE.png is one candidate for CASE, not two
        index[p].append(path)
  return index


def _pick_image(key, index, at, manual_dir, skip_missing):
  candidates = index.get(key, [])
  converted = [p for p in candidates if not p.lower().endswith((".dcm", ".dicom"))]
  chosen = converted or candidates
  if not chosen and skip_missing:  # a path that is not there: the image check counts it as missing
    return os.path.join(manual_dir, key)
  if not chosen:
    raise common.DataError(f"{at}: no image found for {key!r} (neither {key}.png/.jpg nor a file inside a "
                           f"folder named {key}). Expected layout:\n{LAYOUT}")
  if len(chosen) > 1:
    raise common.DataError(f"{at}: {len(chosen)} candidate images for {key!r}: {chosen[:5]}; keep one "
                           "full-mammogram file per folder")
  return chosen[0]


def _read_cbis(manual_dir, opts):
  csvs = _find_csvs(manual_dir, opts)
  index = _index_images(manual_dir)
  images = {}  # folder key -> accumulated example
  for name, path in csvs.items():
    family, official = CSV_FILES[name]
    _, table = common.read_csv(path, CSV_COLUMNS)
    for line, r in table:
      if r["pathology"] not in PATHOLOGIES:
        raise common.DataError(f"{common.where(path, line, 'pathology')}: unknown label value "
                               f"{r['pathology']!r}; expected one of {list(PATHOLOGIES)}")
      key = r["image file path"].replace("\\", "/").strip("/").split("/")[0]
      if not key:
        raise common.DataError(f"{common.where(path, line, 'image file path')}: empty image path")
      if not r["patient_id"]:
        raise common.DataError(f"{common.where(path, line, 'patient_id')}: empty patient_id")
      entry = images.get(key)
      if entry is None:
        entry = images[key] = {"where": common.where(path, line, "image file path"), "family": family,
                               "official": official, "patient": r["patient_id"],
                               "breast": r["left or right breast"], "view": r["image view"],
                               "pathologies": []}
      elif entry["patient"] != r["patient_id"]:
        raise common.DataError(f"{common.where(path, line, 'patient_id')}: image {key!r} is listed for "
                               f"patients {entry['patient']!r} and {r['patient_id']!r}")
      entry["pathologies"].append(r["pathology"])
  if opts["task"] == "benign_malignant":
    images = _merge_families(images)
  rows = []
  for key in sorted(images):
    e = images[key]
    worst = max(e["pathologies"], key=PATHOLOGIES.index)
    label = int(worst == "MALIGNANT") if opts["task"] == "benign_malignant" else int(e["family"] == "calcification")
    rows.append(common.Row(
        id=key, image=_pick_image(key, index, e["where"], manual_dir, opts["skip_bad_images"]), where=e["where"],
        label=label,
        group=f"patient:{e['patient']}", official=e["official"],
        features={"patient": e["patient"], "breast": e["breast"], "view": e["view"],
                  "abnormality": e["family"], "pathology": worst,
                  "num_abnormalities": len(e["pathologies"])}))
  return rows, list(csvs.values())


def _merge_families(images):
  """A mammogram with both a mass and a calcification is in both CSV families, under two folders
  (Mass-Training_P_X_LEFT_CC, Calc-Training_P_X_LEFT_CC) that hold the same DDSM image. For
  benign/malignant it is one example: the file of the first folder by name (Calc- before Mass-),
  the worst of all its abnormalities, and the test split when either family's release puts it there."""
  first_of, merged, moved_to_test = {}, {}, []
  for key, e in sorted(images.items()):
    view = (e["patient"], e["breast"], e["view"])
    other = first_of.get(view)
    if other is None or merged[other]["family"] == e["family"]:
      first_of.setdefault(view, key)
      merged[key] = dict(e, pathologies=list(e["pathologies"]))
      continue
    m = merged[other]
    if m["official"] != e["official"]:
      moved_to_test.append(other)
      m["official"] = "test"
    m["family"] = "both"
    m["pathologies"] += e["pathologies"]
    m["where"] += f"; also {e['where']}"
  if moved_to_test:
    logging.warning("cbis_ddsm: %d mammogram(s) are in one family's Training CSV and the other's Test CSV; "
                    "they are test examples: %s", len(moved_to_test), ", ".join(moved_to_test[:10]))
  return merged


# ----------------------------------------------------------------------------- the paper's lists


def _label_from_name(relpath, at, task):
  for name in (os.path.basename(relpath), relpath):
    for i, prefix in enumerate(("normal", "benign", "cancer")):
      if name.lower().startswith(prefix):
        return min(i, 1) if task == "normal_abnormal" else i
  raise common.DataError(f"{at}: cannot tell the label of {relpath!r}; file names must start with "
                         "normal, benign or cancer")


def _first_list(manual_dir):
  return common.find_file(manual_dir, ["ddsm_raw_image_lists/train.txt", "train.txt"],
                          "CBIS-DDSM list file train.txt", LAYOUT)


def _read_lists(manual_dir, opts):
  lists_dir = os.path.dirname(_first_list(manual_dir))
  image_root = os.path.join(os.path.dirname(lists_dir), "ddsm_raw")
  if not os.path.isdir(image_root):
    image_root = os.path.dirname(lists_dir)
  rows, sources = [], []
  for list_name, split in LIST_SPLITS.items():
    path = os.path.join(lists_dir, list_name)
    if not os.path.isfile(path):
      raise common.DataError(f"{path} is missing; the lists layout needs train.txt, val.txt and test.txt. "
                             f"Expected layout:\n{LAYOUT}")
    sources.append(path)
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first path
      for line, text in enumerate(f, 1):
        relpath = text.strip()
        if not relpath:
          continue
        at = f"{path}, line {line}"
        image = os.path.join(image_root, relpath)
        png = os.path.splitext(image)[0] + ".png"
        if not image.lower().endswith(".png") and os.path.isfile(png):
          image = png  # the paper's loader prefers a converted .png next to the original
        case = re.search(r"[A-D]_\d{4}", os.path.basename(relpath))
        rows.append(common.Row(id=relpath, image=image, where=at,
                               label=_label_from_name(relpath, at, opts["task"]),
                               group=None if case is None else f"case:{case.group(0)}",
                               official=split, features={"path": relpath}))
  return rows, sources
