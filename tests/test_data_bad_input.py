"""Bad input stops a build with the file, row and column at fault, or is skipped and recorded."""
import csv
import os
import re

import pytest

import mfjax.data
from mfjax.data import DataError, synthetic


def _rewrite_csv(path, edit):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  rows = edit(rows)
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(rows)
  return rows


@pytest.fixture
def aptos(tmp_path):
  return synthetic.aptos2019(str(tmp_path / "aptos"), num_images=30), str(tmp_path / "tfds")


def _image_of_line(manual, line):
  with open(os.path.join(manual, "train.csv"), newline="") as f:
    rows = list(csv.reader(f))
  return os.path.join(manual, "train_images", rows[line - 1][0] + ".png")


def test_missing_image_names_file_and_row(aptos):
  manual, data_dir = aptos
  image = _image_of_line(manual, 5)
  os.remove(image)
  with pytest.raises(DataError) as e:
    mfjax.data.build("aptos2019", manual, data_dir)
  message = str(e.value)
  assert image in message and "missing" in message
  assert f"{os.path.join(manual, 'train.csv')}, line 5, column 'id_code'" in message
  assert not os.path.exists(os.path.join(data_dir, "aptos2019")) or not any(
      f == "dataset_info.json" for _, _, fs in os.walk(os.path.join(data_dir, "aptos2019")) for f in fs)


def test_unreadable_image_names_file_and_row(aptos):
  manual, data_dir = aptos
  image = _image_of_line(manual, 9)
  with open(image, "r+b") as f:
    f.truncate(60)  # a cut-off download
  with pytest.raises(DataError, match=re.escape(image) + r": unreadable .*line 9, column 'id_code'"):
    mfjax.data.build("aptos2019", manual, data_dir)


def test_skip_bad_images_reports_and_records_them(aptos):
  manual, data_dir = aptos
  missing, broken = _image_of_line(manual, 3), _image_of_line(manual, 4)
  os.remove(missing)
  with open(broken, "wb") as f:
    f.write(b"not an image")
  ds = mfjax.data.build("aptos2019", manual, data_dir, skip_bad_images=True)
  assert sum(ds.split_sizes.values()) == 28
  assert ds.metadata["num_skipped"] == 2
  skipped = {s["image"]: s for s in ds.skipped}
  assert skipped[missing]["problem"] == "missing" and "line 3" in skipped[missing]["source"]
  assert skipped[broken]["problem"].startswith("unreadable") and "line 4" in skipped[broken]["source"]
  # The record survives reloading: it is in the dataset's metadata.json.
  assert mfjax.data.load(ds.path).metadata["num_skipped"] == 2


@pytest.mark.parametrize("value", ["7", "mild", "", "2.5"])
def test_unknown_label_names_file_row_column_value(aptos, value):
  manual, data_dir = aptos
  _rewrite_csv(os.path.join(manual, "train.csv"), lambda rows: rows[:6] + [[rows[6][0], value]] + rows[7:])
  with pytest.raises(DataError, match=re.escape(f"train.csv, line 7, column 'diagnosis': unknown label {value!r}")):
    mfjax.data.build("aptos2019", manual, data_dir)


def test_missing_column_names_the_column(aptos):
  manual, data_dir = aptos
  _rewrite_csv(os.path.join(manual, "train.csv"), lambda rows: [[r[0]] for r in rows])
  with pytest.raises(DataError, match=r"train.csv is missing required column\(s\) \['diagnosis'\]"):
    mfjax.data.build("aptos2019", manual, data_dir)


def test_empty_split_is_refused(tmp_path):
  manual = synthetic.aptos2019(str(tmp_path / "tiny"), num_images=4)
  with pytest.raises(DataError, match=r"split\(s\) \['test'\] would be empty \(sizes \{'train': 3, "):
    mfjax.data.build("aptos2019", manual, str(tmp_path / "tfds"))


def test_bad_options_and_folders(aptos, tmp_path):
  manual, data_dir = aptos
  with pytest.raises(DataError, match=r"unknown option\(s\) \['sede'\]; valid options are .*'seed'"):
    mfjax.data.build("aptos2019", manual, data_dir, sede=1)
  with pytest.raises(DataError, match="split='wrong'"):
    mfjax.data.build("aptos2019", manual, data_dir, split="wrong")
  with pytest.raises(DataError, match="aptos2019 has no official split"):
    mfjax.data.build("aptos2019", manual, data_dir, split="official")
  with pytest.raises(DataError, match="views='side'"):
    mfjax.data.build("chexpert", manual, data_dir, views="side")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(DataError, match="CheXpert train.csv not found .*CheXpert-v1.0-small/"):
    mfjax.data.build("chexpert", str(tmp_path / "empty"), data_dir)
  with pytest.raises(DataError, match="is not a folder"):
    mfjax.data.build("aptos2019", str(tmp_path / "nowhere"), data_dir)


def test_isic_label_errors(tmp_path):
  manual = synthetic.isic2019(str(tmp_path / "isic"), num_images=24)
  path = os.path.join(manual, "ISIC_2019_Training_GroundTruth.csv")
  original = _rewrite_csv(path, lambda rows: rows)

  def set_cell(line, column, value):
    def edit(rows):
      rows = [list(r) for r in original]
      rows[line - 1][rows[0].index(column)] = value
      return rows
    _rewrite_csv(path, edit)

  set_cell(4, "NV", "0.5")
  with pytest.raises(DataError, match=r"line 4, column 'NV': unknown label value '0.5'"):
    mfjax.data.build("isic2019", manual, str(tmp_path / "tfds"))
  set_cell(5, "UNK", "1.0")
  with pytest.raises(DataError, match=r"line 5, column 'UNK': UNK is positive"):
    mfjax.data.build("isic2019", manual, str(tmp_path / "tfds"))
  row = original[5]
  zero_col = next(c for c in range(1, 9) if row[c] == "0.0")
  set_cell(6, original[0][zero_col], "1.0")
  with pytest.raises(DataError, match=r"line 6: 2 positive classes"):
    mfjax.data.build("isic2019", manual, str(tmp_path / "tfds"))


def test_chexpert_label_and_column_errors(tmp_path):
  manual = synthetic.chexpert(str(tmp_path / "cx"), num_patients=10)
  path = os.path.join(manual, "CheXpert-v1.0-small", "train.csv")
  original = _rewrite_csv(path, lambda rows: rows)
  edema = original[0].index("Edema")
  _rewrite_csv(path, lambda rows: rows[:3] + [rows[3][:edema] + ["2.0"] + rows[3][edema + 1:]] + rows[4:])
  with pytest.raises(DataError, match=r"train.csv, line 4, column 'Edema': unknown label value '2.0'"):
    mfjax.data.build("chexpert", manual, str(tmp_path / "tfds"))
  _rewrite_csv(path, lambda rows: [r[:edema] + r[edema + 1:] for r in original])
  with pytest.raises(DataError, match=r"missing required column\(s\) \['Edema'\]"):
    mfjax.data.build("chexpert", manual, str(tmp_path / "tfds"))


def test_cbis_ddsm_errors(tmp_path):
  manual = synthetic.cbis_ddsm(str(tmp_path / "cbis"), num_patients=16)
  path = os.path.join(manual, "mass_case_description_train_set.csv")
  original = _rewrite_csv(path, lambda rows: rows)
  pathology = original[0].index("pathology")
  _rewrite_csv(path, lambda rows: rows[:2] + [rows[2][:pathology] + ["MAYBE"] + rows[2][pathology + 1:]] + rows[3:])
  with pytest.raises(DataError, match=r"line 6, column 'pathology': unknown label value 'MAYBE'"):
    mfjax.data.build("cbis_ddsm", manual, str(tmp_path / "tfds"))
  _rewrite_csv(path, lambda rows: original)
  key = original[1][original[0].index("image file path")].split("/")[0]
  folder = os.path.join(manual, "CBIS-DDSM", key)
  os.rename(folder, folder + "_moved")
  with pytest.raises(DataError, match=rf"line 2, column 'image file path': no image found for '{key}'"):
    mfjax.data.build("cbis_ddsm", manual, str(tmp_path / "tfds"))
  # skip_bad_images covers a mammogram missing from a partial download: left out and recorded.
  built = mfjax.data.build("cbis_ddsm", manual, str(tmp_path / "tfds"), skip_bad_images=True)
  assert [(s["id"], s["problem"]) for s in built.metadata["skipped"]] == [(key, "missing")]
  os.rename(folder + "_moved", folder)
  # abnormality='both' needs both families' CSVs: without the calcification ones it is an error, not mass only.
  for name in ("calc_case_description_train_set.csv", "calc_case_description_test_set.csv"):
    os.rename(os.path.join(manual, name), os.path.join(tmp_path, name))
  with pytest.raises(DataError, match=r"abnormality='both' needs calc_case_description_train_set.csv, "
                                     r"calc_case_description_test_set.csv"):
    mfjax.data.build("cbis_ddsm", manual, str(tmp_path / "tfds2"))
  assert mfjax.data.build("cbis_ddsm", manual, str(tmp_path / "tfds2"), abnormality="mass").split_sizes

  lists = synthetic.ddsm_lists(str(tmp_path / "lists"), num_cases=15)
  with open(os.path.join(lists, "ddsm_raw_image_lists", "val.txt"), "a") as f:
    f.write("mystery_01_A_0001_1.LEFT_CC.png\n")
  with pytest.raises(DataError, match=r"val.txt, line \d+: cannot tell the label of 'mystery_01"):
    mfjax.data.build("cbis_ddsm", lists, str(tmp_path / "tfds"), layout="lists")


def test_a_converted_mammogram_in_a_folder_of_its_own_name_is_one_candidate(tmp_path):
  from mfjax.data import cbis_ddsm
  key = "Mass-Training_P_00001_LEFT_CC"
  for rel in (f"converted/{key}/{key}.png", f"CBIS-DDSM/{key}/1.3.6/1.3.6.1/1-1.dcm"):
    os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
    (tmp_path / rel).write_bytes(b"x")
  index = cbis_ddsm._index_images(str(tmp_path))
  picked = cbis_ddsm._pick_image(key, index, "row 2", str(tmp_path), False)
  assert picked == str(tmp_path / f"converted/{key}/{key}.png")


def test_a_parent_folder_of_several_datasets_gives_each_its_own_csv(tmp_path):
  """manual_dir may be the parent of the download: another dataset's train.csv beside it is passed over."""
  from mfjax.data import common
  (tmp_path / "CheXpert-v1.0-small").mkdir()
  (tmp_path / "CheXpert-v1.0-small" / "train.csv").write_text("Path,Sex,Age\n")
  (tmp_path / "aptos2019-blindness-detection").mkdir()
  (tmp_path / "aptos2019-blindness-detection" / "train.csv").write_text("id_code,diagnosis\n")
  assert common.find_file(str(tmp_path), ["train.csv"], "APTOS 2019 train.csv", "", ["id_code", "diagnosis"]) == \
      str(tmp_path / "aptos2019-blindness-detection" / "train.csv")
  (tmp_path / "chexpert").mkdir()
  os.rename(tmp_path / "CheXpert-v1.0-small", tmp_path / "chexpert" / "CheXpert-v1.0-small")
  candidates = ["CheXpert-v1.0-small/train.csv", "CheXpert-v1.0/train.csv", "train.csv"]
  assert common.find_file(str(tmp_path), candidates, "CheXpert train.csv", "", ["Path"]) == \
      str(tmp_path / "chexpert" / "CheXpert-v1.0-small" / "train.csv")
  # None fits: the first found, whose reader names the columns it lacks.
  assert common.find_file(str(tmp_path / "aptos2019-blindness-detection"), candidates, "", "", ["Path"]) == \
      str(tmp_path / "aptos2019-blindness-detection" / "train.csv")


def test_a_build_finished_meanwhile_by_another_process_is_used(aptos, monkeypatch):
  manual, data_dir = aptos
  builder = mfjax.data.BUILDERS["aptos2019"]
  real = builder.download_and_prepare

  def lose_the_race(self, **kwargs):  # the other process renames its finished build into place first
    real(self, **kwargs)
    raise FileExistsError("Cannot rename incomplete.XXXX_1.0.0: the folder exists")

  monkeypatch.setattr(builder, "download_and_prepare", lose_the_race)
  assert sum(mfjax.data.build("aptos2019", manual, data_dir).split_sizes.values()) == 30


def test_isic_metadata_added_after_a_build_is_a_changed_source(tmp_path, caplog):
  manual = synthetic.isic2019(str(tmp_path / "isic"), num_images=40, metadata=False)
  built = mfjax.data.build("isic2019", manual, str(tmp_path / "tfds"))
  assert "images of one lesion cannot be kept in one split" in caplog.text
  assert not any(built.source("train")[i]["lesion_id"] for i in range(3))
  synthetic.isic2019(str(tmp_path / "isic"), num_images=40, metadata=True)  # the same images, with metadata now
  with pytest.raises(DataError, match=r"changed, are gone or were added .*ISIC_2019_Training_Metadata.csv"):
    mfjax.data.build("isic2019", manual, str(tmp_path / "tfds"))
  rebuilt = mfjax.data.build("isic2019", manual, str(tmp_path / "tfds"), overwrite=True)
  assert sum(rebuilt.split_sizes.values()) == sum(built.split_sizes.values()) == 40
  assert all(rebuilt.source("train")[i]["lesion_id"] for i in range(3))


def test_csv_images_errors(tmp_path):
  manual = synthetic.csv_images(str(tmp_path / "own"), num_images=30)
  with pytest.raises(DataError, match="set exactly one of label_column"):
    mfjax.data.build("csv_images", manual, str(tmp_path / "tfds"))
  # Options from a command line arrive as strings: "a,b" is two classes, "0.5" one mean.
  built = mfjax.data.build("csv_images", manual, str(tmp_path / "tfds_cli"), label_column="label",
                           class_names="benign, malignant, normal", mean="0.5,0.5,0.5", std="0.25,0.25,0.25")
  assert built.spec.class_names == ("benign", "malignant", "normal") and built.spec.std == (0.25,) * 3
  with pytest.raises(DataError, match=r"mean=\('fast',\) must be 3 number"):
    mfjax.data.build("csv_images", manual, str(tmp_path / "tfds_bad"), label_column="label", mean="fast")
  with pytest.raises(DataError, match=r"line \d+, column 'label': unknown label value 'normal'; the classes are"):
    mfjax.data.build("csv_images", manual, str(tmp_path / "tfds"), label_column="label",
                     class_names=["benign", "malignant"])
  path = os.path.join(manual, "labels.csv")
  _rewrite_csv(path, lambda rows: rows + [rows[1]])
  with pytest.raises(DataError, match=r"duplicate example id 'images/0/img_0000.png' at .*line 32.* and .*line 2"):
    mfjax.data.build("csv_images", manual, str(tmp_path / "tfds"), label_column="label")


def test_csv_images_blank_label_is_refused(tmp_path):
  manual = synthetic.csv_images(str(tmp_path / "own"), num_images=12)
  path = os.path.join(manual, "labels.csv")
  label = _rewrite_csv(path, lambda rows: rows)[0].index("label")
  _rewrite_csv(path, lambda rows: rows[:4] + [rows[4][:label] + [" "] + rows[4][label + 1:]] + rows[5:])
  # Without class_names a blank cell would otherwise have become a class of its own, named ''.
  with pytest.raises(DataError, match=r"labels.csv, line 5, column 'label': empty label"):
    mfjax.data.build("csv_images", manual, str(tmp_path / "tfds"), label_column="label")
  with pytest.raises(DataError, match=r"line 5, column 'label': unknown label value ''"):
    mfjax.data.build("csv_images", manual, str(tmp_path / "tfds"), label_column="label",
                     class_names="benign,malignant,normal")


def test_no_usable_examples_is_a_clear_error(aptos, tmp_path):
  manual, data_dir = aptos
  _rewrite_csv(os.path.join(manual, "train.csv"), lambda rows: rows[:1])
  with pytest.raises(DataError, match=r"aptos2019: no usable examples in .*\(0 read from .*train.csv, 0 skipped"):
    mfjax.data.build("aptos2019", manual, data_dir)
  few = synthetic.aptos2019(str(tmp_path / "few"), num_images=3)
  for name in os.listdir(os.path.join(few, "train_images")):
    os.remove(os.path.join(few, "train_images", name))
  with pytest.raises(DataError, match=r"no usable examples .*\(3 read from .*, 3 skipped as missing or unreadable"):
    mfjax.data.build("aptos2019", few, data_dir, skip_bad_images=True)


def test_an_error_names_the_line_where_a_multi_line_row_starts(tmp_path):
  manual = synthetic.cbis_ddsm(str(tmp_path / "cbis"), num_patients=16)
  path = os.path.join(manual, "mass_case_description_train_set.csv")
  rows = _rewrite_csv(path, lambda rows: rows)
  image, pathology = rows[0].index("image file path"), rows[0].index("pathology")
  assert rows[1][image].endswith("\n")  # as in TCIA's CSVs: each of 3 quoted path cells ends in a line break
  _rewrite_csv(path, lambda rows: rows[:3] + [rows[3][:pathology] + ["MAYBE"] + rows[3][pathology + 1:]] + rows[4:])
  # So a row takes 4 lines: the third row starts on line 10.
  with pytest.raises(DataError, match=r"line 10, column 'pathology': unknown label value 'MAYBE'"):
    mfjax.data.build("cbis_ddsm", manual, str(tmp_path / "tfds"))


def test_a_misspelt_label_that_makes_a_rare_class_is_warned_about(tmp_path, caplog):
  manual = synthetic.csv_images(str(tmp_path / "own"), num_images=30)
  path = os.path.join(manual, "labels.csv")
  label = _rewrite_csv(path, lambda rows: rows)[0].index("label")
  _rewrite_csv(path, lambda rows: rows[:4] + [rows[4][:label] + ["maligant"] + rows[4][label + 1:]] + rows[5:])
  with caplog.at_level("WARNING", logger="mfjax"):
    built = mfjax.data.build("csv_images", manual, str(tmp_path / "tfds"), label_column="label")
  assert "maligant" in built.spec.class_names  # the documented rule: every distinct value is a class
  assert "class(es) with fewer than 3 rows: 'maligant' (1)" in caplog.text
  for value, row in (("inf", 2), ("1e400", 3)):   # a number too large for an int is an unknown label too
    aptos = synthetic.aptos2019(str(tmp_path / f"aptos_{value}"), num_images=6)
    diagnosis = _rewrite_csv(os.path.join(aptos, "train.csv"), lambda rows: rows)[0].index("diagnosis")
    edit = lambda rows: rows[:row] + [rows[row][:diagnosis] + [value] + rows[row][diagnosis + 1:]] + rows[row + 1:]
    _rewrite_csv(os.path.join(aptos, "train.csv"), edit)
    with pytest.raises(DataError, match=rf"line {row + 1}, column 'diagnosis': unknown label '{value}'"):
      mfjax.data.build("aptos2019", aptos, str(tmp_path / "tfds"))


def test_csv_images_split_column_goes_with_the_official_split(tmp_path):
  manual = synthetic.csv_images(str(tmp_path / "own"), num_images=30)
  rows = _rewrite_csv(os.path.join(manual, "labels.csv"), lambda rows: [rows[0] + ["split"]] + [
      r + ["test" if i < 5 else ""] for i, r in enumerate(rows[1:])])
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(DataError, match=r"split_column='split' is read only with split='official' \(split='seeded' "
                                      r"would ignore it\): add split=official"):
    mfjax.data.build("csv_images", manual, data_dir, label_column="label", split_column="split")
  with pytest.raises(DataError, match=r"split='official' needs split_column=.*; without one, use split='seeded'"):
    mfjax.data.build("csv_images", manual, data_dir, label_column="label", split="official")
  built = mfjax.data.build("csv_images", manual, data_dir, label_column="label", split_column="split",
                           split="official")
  test = built.source("test")
  assert sorted(test[i]["id"].decode() for i in range(len(test))) == sorted(r[0] for r in rows[1:6])
  _rewrite_csv(os.path.join(manual, "labels.csv"), lambda rows: rows[:1] + [r[:-1] + [""] for r in rows[1:]])
  with pytest.raises(DataError, match=r"labels.csv: column 'split' \(split_column\) is blank in every row"):
    mfjax.data.build("csv_images", manual, str(tmp_path / "tfds_blank"), label_column="label",
                     split_column="split", split="official")
