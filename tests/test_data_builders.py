"""Each builder on synthetic files in the original layout: counts, labels, splits, determinism."""
import csv
import glob
import hashlib
import io
import json
import os
import re
import shutil

import numpy as np
import PIL.Image
import pytest

import mfjax.data
from mfjax.data import chexpert, common, isic2019, synthetic


def _records(ds, split):
  source = ds.source(split)
  return [source[i] for i in range(len(source))]


def _all(ds):
  return {s: _records(ds, s) for s in mfjax.data.SPLITS}


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _text(value):
  return value.decode() if isinstance(value, bytes) else value


def _check_stratified(ds, records, fractions):
  labels = np.concatenate([[r["label"] for r in records[s]] for s in mfjax.data.SPLITS])
  for k in range(ds.spec.num_classes):
    n_k = np.sum(labels == k)
    for s, f in zip(mfjax.data.SPLITS, fractions):
      got = sum(r["label"] == k for r in records[s])
      assert abs(got - f * n_k) < 2, (ds.name, k, s, got, f * n_k)


@pytest.fixture(scope="module")
def root(module_tmp):
  return module_tmp.mktemp("data_builders")


def test_aptos2019(root):
  manual = synthetic.aptos2019(str(root / "aptos"), num_images=40)
  ds = mfjax.data.build("aptos2019", manual, str(root / "tfds"))
  assert ds.split_sizes == {"train": 28, "validation": 6, "test": 6}  # the paper's 70/15/15
  assert ds.spec.num_classes == 5 and ds.spec.headline_metric == "quadratic_kappa"
  assert ds.spec.mean == (0.415, 0.221, 0.073) and ds.spec.channels == 3
  records = _all(ds)
  _check_stratified(ds, records, (0.7, 0.15, 0.15))
  truth = {r["id_code"]: int(r["diagnosis"]) for r in _csv(os.path.join(manual, "train.csv"))}
  seen = [(_text(r["id"]), r["label"]) for s in records for r in records[s]]
  assert sorted(i for i, _ in seen) == sorted(truth)  # every row once, no overlap
  assert all(truth[i] == label for i, label in seen)
  r = records["test"][0]
  with open(os.path.join(manual, "train_images", _text(r["id"]) + ".png"), "rb") as f:
    assert r["image"] == f.read()  # PNG RGB originals are stored untouched


def test_isic2019_labels_metadata_and_lesions(root):
  manual = synthetic.isic2019(str(root / "isic"), num_images=64)
  ds = mfjax.data.build("isic2019", manual, str(root / "tfds"))
  assert sum(ds.split_sizes.values()) == 64 and ds.spec.class_names == isic2019.CLASS_NAMES
  truth = {r["image"]: r for r in _csv(os.path.join(manual, isic2019.GROUND_TRUTH))}
  meta = {r["image"]: r for r in _csv(os.path.join(manual, isic2019.METADATA))}
  split_of_lesion = {}
  for split, records in _all(ds).items():
    for r in records:
      name = _text(r["id"])
      assert truth[name][isic2019.CLASS_NAMES[r["label"]]] == "1.0"
      m = meta[name]
      assert _text(r["lesion_id"]) == m["lesion_id"] and _text(r["sex"]) == m["sex"]
      assert (np.isnan(r["age_approx"]) if m["age_approx"] == "" else r["age_approx"] == float(m["age_approx"]))
      assert split_of_lesion.setdefault(m["lesion_id"], split) == split  # lesions never straddle
  # Without the metadata CSV the features are blank and each image is its own group.
  os.remove(os.path.join(manual, isic2019.METADATA))
  bare = mfjax.data.build("isic2019", manual, str(root / "tfds_bare"))
  assert all(_text(r["lesion_id"]) == "" for r in _records(bare, "train"))


def test_chexpert_patients_codes_views_and_official_split(root):
  manual = synthetic.chexpert(str(root / "chexpert"), num_patients=30)
  train_csv = os.path.join(manual, "CheXpert-v1.0-small", "train.csv")
  valid_csv = os.path.join(manual, "CheXpert-v1.0-small", "valid.csv")
  rows = {r["Path"]: r for r in _csv(train_csv)}
  ds = mfjax.data.build("chexpert", manual, str(root / "tfds"))
  assert sum(ds.split_sizes.values()) == len(rows) and ds.spec.multi_label and ds.spec.channels == 1
  patients = {}
  for split, records in _all(ds).items():
    for r in records:
      row = rows[_text(r["id"])]
      expected = [chexpert.BLANK if row[o] == "" else int(float(row[o])) for o in chexpert.OBSERVATIONS]
      np.testing.assert_array_equal(r["labels"], expected)
      assert patients.setdefault(_text(r["patient"]), split) == split, "a patient is in two splits"
      assert PIL.Image.open(io.BytesIO(r["image"])).mode == "L"  # grayscale stays one channel
  assert len(set(patients.values())) == 3

  frontal = mfjax.data.build("chexpert", manual, str(root / "tfds"), views="frontal", split="official")
  n_frontal = sum(r["Frontal/Lateral"] == "Frontal" for r in rows.values())
  valid_frontal = [r["Path"] for r in _csv(valid_csv) if r["Frontal/Lateral"] == "Frontal"]
  assert frontal.split_sizes["train"] + frontal.split_sizes["validation"] == n_frontal
  assert sorted(_text(r["id"]) for r in _records(frontal, "test")) == sorted(valid_frontal)
  # The release folder may be renamed, or be the manual_dir itself.
  renamed = os.path.join(str(root), "my_chexpert")
  os.rename(os.path.join(manual, "CheXpert-v1.0-small"), renamed)
  moved = mfjax.data.build("chexpert", renamed, str(root / "tfds_renamed"))
  assert moved.split_sizes == ds.split_sizes


def test_cbis_ddsm_official_release_from_dicom(root):
  manual = synthetic.cbis_ddsm(str(root / "cbis"), num_patients=16)
  ds = mfjax.data.build("cbis_ddsm", manual, str(root / "tfds"))
  assert ds.spec.class_names == ("benign", "malignant") and ds.spec.headline_metric == "roc_auc"
  rows = []
  for name in ("mass", "calc"):
    for split in ("train", "test"):
      rows += _csv(os.path.join(manual, f"{name}_case_description_{split}_set.csv"))
  folders_of, malignant_of = {}, {}
  for r in rows:  # one example per full mammogram, malignant if any abnormality is
    # A mammogram in both CSV families (patients 17 and 18) is one example, under its first folder by name.
    view = (r["patient_id"], r["left or right breast"], r["image view"])
    folders_of.setdefault(view, set()).add(r["image file path"].split("/")[0])
    malignant_of[view] = malignant_of.get(view, False) or r["pathology"] == "MALIGNANT"
  keys = {min(folders_of[view]): malignant for view, malignant in malignant_of.items()}
  assert sum(len(f) == 2 for f in folders_of.values()) == 4
  records = _all(ds)
  got = {_text(r["id"]): (r["label"], split) for split in records for r in records[split]}
  assert {k: bool(v[0]) for k, v in got.items()} == keys
  both = {_text(r["id"]): int(r["num_abnormalities"]) for s in records for r in records[s]
          if _text(r["abnormality"]) == "both"}
  assert sorted(both) == [f"Calc-{s}_P_000{p}_{b}_{v}" for s, p, b in (("Test", 18, "RIGHT"), ("Training", 17, "LEFT"))
                          for v in ("CC", "MLO")]
  assert ds.metadata["groups_in_two_splits"] == {} and ds.metadata["mfjax_version"] == "1.1.0"
  assert ds.path.rstrip("/").endswith("/1.1.0")  # a 1.0.0 build (each such mammogram twice) is not reused
  patients = {}
  for key, (_, split) in got.items():
    assert patients.setdefault(key.split("_P_")[1][:5], split) == split
  # The full image (not the half-size ROI crop) was read from DICOM, bright lesion kept bright
  # also for MONOCHROME1 files (patients 5, 10, 15).
  for split in records:
    for r in records[split]:
      image = np.asarray(PIL.Image.open(io.BytesIO(r["image"])))
      assert image.shape == (64, 64) and image.max() == 255
      assert np.mean(image[:, :5]) > np.mean(image[:, -3:]), "MONOCHROME1 was not inverted"

  official = mfjax.data.build("cbis_ddsm", manual, str(root / "tfds"), split="official",
                              task="mass_calcification")
  test_ids = {_text(r["id"]) for r in _records(official, "test")}
  folders = {r["image file path"].split("/")[0] for r in rows}
  assert test_ids == {k for k in folders if "-Test_" in k}
  assert all(r["label"] == int(_text(r["id"]).startswith("Calc")) for r in _records(official, "train"))
  # Kept as published: patient 18's families are in different splits, and the metadata says so.
  assert official.metadata["groups_in_two_splits"] == {"patient:P_00018": ["train", "test"]}
  # For benign/malignant her mammogram in both families is a test example, the other breast train.
  official = mfjax.data.build("cbis_ddsm", manual, str(root / "tfds"), split="official")
  split_of = {_text(r["id"]): s for s, rs in _all(official).items() for r in rs}
  assert split_of["Calc-Test_P_00018_RIGHT_CC"] == "test" and split_of["Mass-Training_P_00018_LEFT_CC"] == "train"
  assert "Mass-Training_P_00018_RIGHT_CC" not in split_of


def test_cbis_ddsm_converted_png_and_paper_lists(root):
  converted = synthetic.cbis_ddsm(str(root / "cbis_png"), num_patients=24, dicom=False)
  ds = mfjax.data.build("cbis_ddsm", converted, str(root / "tfds"), abnormality="mass")
  assert all(_text(r["abnormality"]) == "mass" for r in _records(ds, "train"))

  lists = synthetic.ddsm_lists(str(root / "lists"), num_cases=15)
  paper = mfjax.data.build("cbis_ddsm", lists, str(root / "tfds"), layout="lists", split="official")
  for split, list_name in (("train", "train.txt"), ("validation", "val.txt"), ("test", "test.txt")):
    with open(os.path.join(lists, "ddsm_raw_image_lists", list_name)) as f:
      paths = f.read().split()
    records = _records(paper, split)
    assert sorted(_text(r["id"]) for r in records) == sorted(paths)
    assert all(r["label"] == int(not _text(r["id"]).startswith("normal")) for r in records)
  three = mfjax.data.build("cbis_ddsm", lists, str(root / "tfds"), layout="lists", seed=3,
                           task="normal_benign_cancer")
  assert three.spec.num_classes == 3 and three.spec.headline_metric == "macro_recall"


def test_csv_images_multiclass_multilabel_and_split_column(root):
  manual = synthetic.csv_images(str(root / "own"), num_images=45)
  ds = mfjax.data.build("csv_images", manual, str(root / "tfds"), label_column="label",
                        group_column="patient")
  assert ds.spec.class_names == ("benign", "malignant", "normal") and ds.spec.headline_metric == "accuracy"
  assert ds.spec.mean == pytest.approx(ds.metadata["measured_train_mean"])  # measured at build time
  truth = {r["image"]: r for r in _csv(os.path.join(manual, "labels.csv"))}
  split_of_patient = {}
  for split, records in _all(ds).items():
    for r in records:
      row = truth[_text(r["id"])]
      assert ds.spec.class_names[r["label"]] == row["label"]
      assert split_of_patient.setdefault(row["patient"], split) == split

  multi = synthetic.csv_images(str(root / "own_multi"), num_images=40, multi_label=True)
  ml = mfjax.data.build("csv_images", multi, str(root / "tfds"), label_columns=["benign", "malignant", "normal"])
  assert ml.spec.multi_label and ml.spec.headline_metric == "mean_auc"
  truth = {r["image"]: r for r in _csv(os.path.join(multi, "labels.csv"))}
  for r in _records(ml, "train"):
    row = truth[_text(r["id"])]
    np.testing.assert_array_equal(r["labels"], [int(row[c]) for c in ("benign", "malignant", "normal")])

  # An official split column is followed; blank rows are split by seed.
  path = os.path.join(manual, "labels.csv")
  rows = _csv(path)
  for i, r in enumerate(rows):
    r["fold"] = "test" if i < 6 else ""
  with open(os.path.join(manual, "folds.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  folds = mfjax.data.build("csv_images", manual, str(root / "tfds"), csv="folds.csv", label_column="label",
                           split_column="fold", split="official")
  assert sorted(_text(r["id"]) for r in _records(folds, "test")) == sorted(r["image"] for r in rows[:6])


def _digest(ds):
  h = hashlib.sha256()
  for f in sorted(glob.glob(os.path.join(ds.path, "*.array_record*"))):
    with open(f, "rb") as fh:
      h.update(os.path.basename(f).encode() + fh.read())
  return h.hexdigest()


def test_builds_are_identical_and_reused(root):
  manual = synthetic.aptos2019(str(root / "det"), num_images=30)
  a = mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4)
  b = mfjax.data.build("aptos2019", manual, str(root / "det_b"), seed=4)
  assert _digest(a) == _digest(b) and a.split_sizes == b.split_sizes
  assert os.path.basename(os.path.dirname(a.path)) == os.path.basename(os.path.dirname(b.path))
  stamp = os.path.getmtime(os.path.join(a.path, "dataset_info.json"))
  again = mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4)
  assert again.path == a.path and os.path.getmtime(os.path.join(a.path, "dataset_info.json")) == stamp
  other_seed = mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=5)
  assert other_seed.path != a.path
  # A changed source CSV is noticed; overwrite=True rebuilds.
  with open(os.path.join(manual, "train.csv"), "a") as f:
    f.write("\n")
  with pytest.raises(common.DataError, match="changed, are gone or were added"):
    mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4)
  rebuilt = mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4, overwrite=True)
  assert _digest(rebuilt) == _digest(a)
  # The build id is the records' content: the same files build the same id (on any machine), another image
  # under the same CSV another one.
  assert a.metadata["build_id"] == b.metadata["build_id"] == rebuilt.metadata["build_id"]
  image = sorted(glob.glob(os.path.join(manual, "train_images", "*.png")))[0]
  PIL.Image.fromarray(255 - np.asarray(PIL.Image.open(image))).save(image)
  # An image replaced under the same CSVs (a corrupt one fixed, say) is noticed too, by its size.
  with pytest.raises(common.DataError, match=r"image files the source CSVs list .* were replaced, removed or added"):
    mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4)
  changed = mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4, overwrite=True)
  assert changed.metadata["build_id"] != a.metadata["build_id"] and changed.fingerprint != a.fingerprint
  assert mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4).path == changed.path
  os.remove(sorted(glob.glob(os.path.join(manual, "train_images", "*.png")))[1])
  with pytest.raises(common.DataError, match=r"replaced, removed or added"):
    mfjax.data.build("aptos2019", manual, str(root / "det_a"), seed=4)


def test_a_copy_of_the_source_csvs_reuses_the_build(root):
  """The TPU recipe: the built dataset and a copy of only the download's CSVs/lists reach the
  workers; the build is reused on the CSVs (the image check needs the images). A changed CSV is
  still refused, and an image beside the copied CSVs brings the image check back."""
  for name, writer in (("aptos2019", synthetic.aptos2019), ("cbis_ddsm", synthetic.cbis_ddsm),
                       ("chexpert", synthetic.chexpert)):
    manual = writer(str(root / f"csvs_{name}"))
    built = mfjax.data.build(name, manual, str(root / "csvs_data"))
    copy, source_dir = root / f"csvs_{name}_copy", built.metadata["source_dir"]  # the sources are named from it
    for source in built.metadata["sources"]:
      if os.path.isfile(os.path.join(source_dir, source)):
        os.makedirs(copy / os.path.dirname(source), exist_ok=True)
        shutil.copy(os.path.join(source_dir, source), copy / source)
    assert mfjax.data.build(name, str(copy), str(root / "csvs_data")).path == built.path, name
  with open(copy / source, "a") as f:
    f.write("\n")
  with pytest.raises(common.DataError, match=r"built from another folder, .*\['train.csv'\] differ"):
    mfjax.data.build(name, str(copy), str(root / "csvs_data"))
  shutil.copy(os.path.join(source_dir, source), copy / source)
  (copy / "an_image.png").write_bytes(b"")
  with pytest.raises(common.DataError, match="image files the source CSVs list .* were replaced, removed or added"):
    mfjax.data.build(name, str(copy), str(root / "csvs_data"))


def test_synthetic_files_are_deterministic_and_carry_the_label(tmp_path):
  def tree_digest(folder):
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
      if os.path.isfile(f):
        h.update(os.path.relpath(f, folder).encode() + open(f, "rb").read())
    return h.hexdigest()

  for writer in (synthetic.aptos2019, synthetic.cbis_ddsm, synthetic.chexpert):
    assert tree_digest(writer(str(tmp_path / f"{writer.__name__}1"))) == tree_digest(
        writer(str(tmp_path / f"{writer.__name__}2")))
  # APTOS grade = number of bright lesions: the bright area grows with the grade.
  rng = np.random.default_rng(0)
  area = [np.mean([(synthetic.fundus_image(rng, g, 96)[..., 2] > 80).mean() for _ in range(5)])
          for g in range(5)]
  assert all(b > a for a, b in zip(area, area[1:])), area


def test_info_without_building():
  spec = mfjax.data.info("cbis_ddsm", layout="lists")
  assert spec.class_names == ("normal", "abnormal") and spec.mean == (0.286,)
  assert mfjax.data.info("chexpert").headline_metric == "mean_auc"
  with pytest.raises(common.DataError, match="unknown dataset 'aptos'"):
    mfjax.data.info("aptos")


def test_build_command(tmp_path, capsys):
  from mfjax.data import __main__ as cli
  manual = synthetic.ddsm_lists(str(tmp_path / "lists"), num_cases=15)
  assert cli.main(["cbis_ddsm", "--manual-dir", manual, "--data-dir", str(tmp_path / "out"),
                   "--option", "layout=lists", "--option", "split=official"]) == 0
  out = capsys.readouterr().out
  assert "splits: {'train': 36, 'validation': 12, 'test': 12}" in out and "roc_auc" in out
  assert cli.main(["cbis_ddsm", "--manual-dir", manual, "--data-dir", str(tmp_path / "out")]) == 2
  assert "no CBIS-DDSM case-description CSV" in capsys.readouterr().err


def test_stored_bytes_convert_only_what_needs_it(tmp_path):
  from mfjax.data import images
  rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
  PIL.Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
  PIL.Image.fromarray(np.dstack([rgb, np.full((40, 60), 255, np.uint8)])).save(tmp_path / "rgba.png")
  deep = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27)
  PIL.Image.fromarray(deep).save(tmp_path / "deep.png")
  raw = (tmp_path / "a.jpg").read_bytes()
  assert images.storage_bytes(str(tmp_path / "a.jpg"), 3) == raw  # already fine: kept as is
  shrunk = PIL.Image.open(io.BytesIO(images.storage_bytes(str(tmp_path / "a.jpg"), 3, shorter_side=20)))
  assert shrunk.format == "JPEG" and shrunk.size == (30, 20)
  rgba = PIL.Image.open(io.BytesIO(images.storage_bytes(str(tmp_path / "rgba.png"), 3)))
  assert rgba.mode == "RGB" and np.array_equal(np.asarray(rgba), rgb)
  gray = PIL.Image.open(io.BytesIO(images.storage_bytes(str(tmp_path / "deep.png"), 1)))
  assert gray.mode == "L" and np.asarray(gray).min() == 0 and np.asarray(gray).max() == 255


def test_store_size_shrinks_stored_images(tmp_path):
  manual = synthetic.aptos2019(str(tmp_path / "aptos"), num_images=20, size=64)
  ds = mfjax.data.build("aptos2019", manual, str(tmp_path / "tfds"), store_size=32)
  assert all(PIL.Image.open(io.BytesIO(r["image"])).size == (32, 32) for r in _records(ds, "train"))


def test_building_leaves_nothing_in_the_system_temp_folder(tmp_path, monkeypatch):
  system_temp = tmp_path / "system_temp"
  system_temp.mkdir()
  monkeypatch.setattr("tempfile.tempdir", str(system_temp))
  manual = synthetic.aptos2019(str(tmp_path / "aptos"), num_images=20)
  mfjax.data.build("aptos2019", manual, str(tmp_path / "tfds"))
  assert os.listdir(system_temp) == []


def test_a_download_given_as_its_folder_or_its_parent_is_one_source(tmp_path):
  """The README's two spellings of an APTOS or CheXpert download (the folder, or its parent) reach the same
  build from either side, also a build recorded by older mfjax relative to the parent (no "source_dir")."""
  chexpert_parent = synthetic.chexpert(str(tmp_path / "chexpert_parent"), num_patients=8)
  aptos_child = synthetic.aptos2019(str(tmp_path / "dl" / "aptos2019-blindness-detection"), num_images=20)
  for name, parent, child in (("chexpert", chexpert_parent, os.path.join(chexpert_parent, "CheXpert-v1.0-small")),
                              ("aptos2019", os.path.dirname(aptos_child), aptos_child)):
    for first, second in ((child, parent), (parent, child)):
      data = str(tmp_path / f"data_{name}_{os.path.basename(first)}")
      built = mfjax.data.build(name, first, data)
      stamp = os.path.getmtime(os.path.join(built.path, "dataset_info.json"))
      assert mfjax.data.build(name, second, data).fingerprint == built.fingerprint, (name, first)
      assert os.path.getmtime(os.path.join(built.path, "dataset_info.json")) == stamp  # reused, not rebuilt
    # As older mfjax recorded a build from the parent: files named relative to the folder given.
    with open(os.path.join(built.path, "metadata.json")) as f:
      metadata = json.load(f)
    source_dir = metadata.pop("source_dir")
    metadata["manual_dir"] = parent
    metadata["sources"] = {os.path.relpath(os.path.join(source_dir, f), parent): d
                           for f, d in metadata["sources"].items()}
    rows, _ = mfjax.data.DATASETS[name].read(child, built.options)
    metadata["image_sizes"] = common.image_sizes(rows, parent)
    with open(os.path.join(built.path, "metadata.json"), "w") as f:
      json.dump(metadata, f)
    for manual in (child, parent):
      assert mfjax.data.build(name, manual, data).metadata == metadata, (name, manual)


def test_overwrite_replaces_a_build_only_once_the_new_one_is_built(tmp_path, monkeypatch):
  """The lists download given without layout=lists names the official release's build: a failed overwrite
  leaves that build in place, and without overwrite it is refused naming the folder that made it."""
  cbis = synthetic.cbis_ddsm(str(tmp_path / "CBIS"), num_patients=8)
  lists = synthetic.ddsm_lists(str(tmp_path / "DDSM"), num_cases=12)
  data = str(tmp_path / "data")
  built = mfjax.data.build("cbis_ddsm", cbis, data)
  files, stamp = sorted(os.listdir(data)), os.path.getmtime(os.path.join(built.path, "dataset_info.json"))
  with pytest.raises(common.DataError, match="no CBIS-DDSM case-description CSV"):
    mfjax.data.build("cbis_ddsm", lists, data, overwrite=True)
  kept = mfjax.data.load(built.path)
  assert kept.fingerprint == built.fingerprint and len(kept.source("train")) == built.split_sizes["train"]
  assert os.path.getmtime(os.path.join(built.path, "dataset_info.json")) == stamp
  assert sorted(os.listdir(data)) == files  # nothing left of the failed build
  with pytest.raises(common.DataError, match=rf"was built from another folder, {re.escape(cbis)}; the source files "
                                             rf".* differ in {re.escape(lists)}"):
    mfjax.data.build("cbis_ddsm", lists, data)
  rename = os.rename

  def swap_fails(src, dst):  # the new build cannot be moved in, after the old one was moved aside
    if os.fspath(dst) == built.path and not os.fspath(src).endswith("replaced"):
      raise OSError("input/output error")
    rename(src, dst)
  monkeypatch.setattr(os, "rename", swap_fails)
  with pytest.raises(OSError, match="input/output error"):
    mfjax.data.build("cbis_ddsm", cbis, data, overwrite=True)
  monkeypatch.setattr(os, "rename", rename)
  assert mfjax.data.load(built.path).fingerprint == built.fingerprint and sorted(os.listdir(data)) == files
  rebuilt = mfjax.data.build("cbis_ddsm", cbis, data, overwrite=True)
  assert rebuilt.path == built.path and rebuilt.metadata["build_id"] == built.metadata["build_id"]
  assert sorted(os.listdir(data)) == files and os.listdir(os.path.dirname(built.path)) == ["1.1.0"]


def test_own_data_from_two_folders_is_not_taken_for_one_changed_folder(tmp_path):
  """Two folders with the same CSV name and options name one build: the second is refused as another folder
  (not as the first one changed), and after an overwrite the first is refused the same way."""
  first = synthetic.csv_images(str(tmp_path / "my_data"), num_images=30)
  second = synthetic.csv_images(str(tmp_path / "my_data_B"), num_images=30, seed=1)
  data = str(tmp_path / "data")
  mfjax.data.build("csv_images", first, data, label_column="label")
  with pytest.raises(common.DataError, match=rf"built from another folder, {re.escape(first)}; the source files "
                                             rf"\['labels.csv'\] differ in {re.escape(second)} .*another data_dir"):
    mfjax.data.build("csv_images", second, data, label_column="label")
  assert mfjax.data.build("csv_images", second, str(tmp_path / "data_B"), label_column="label").split_sizes
  mfjax.data.build("csv_images", second, data, label_column="label", overwrite=True)
  with pytest.raises(common.DataError, match=rf"built from another folder, {re.escape(second)}"):
    mfjax.data.build("csv_images", first, data, label_column="label")
