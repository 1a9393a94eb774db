"""Small synthetic copies of every supported download layout, with a learnable signal.

Each writer creates real files (PNG, JPEG, DICOM, CSV) in the layout the matching builder
reads, and returns the folder to pass as `manual_dir`. Pixels encode the label, so a small
model can learn it:
  aptos2019   grade g = 3g bright yellow lesions on an orange fundus disc
  isic2019    the lesion's colour is the class
  chexpert    observation j positive = bright square in grid cell j (uncertain: dimmer)
  cbis_ddsm   malignant = bright spiculated mass / dense calcification cluster; benign = faint
  ddsm_lists  normal = no lesion, benign = faint blob, cancer = bright blob
  csv_images  class k = k+1 bright bars (multi-label: label j = a bar at row j)
  nnunet_ct   CT volumes (NIfTI, nnU-Net raw layout): a body, a "liver" (+100 HU) and two
              "kidneys" (+250 HU) labelled 1 and 2; spacings and orientations vary per case
Everything is a function of (arguments, seed): the same call writes the same bytes.
"""
import csv
import json
import os

import numpy as np
import PIL.Image

ISIC_COLOURS = ((120, 30, 20), (150, 100, 60), (200, 60, 150), (90, 160, 60), (60, 60, 170),
                (200, 200, 40), (230, 20, 20), (30, 160, 170))


def _disc_mask(size, cy, cx, radius):
  yy, xx = np.mgrid[:size, :size]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def _write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _save(image: np.ndarray, path: str, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(image).save(path, **kwargs)


def _balanced(rng, n, k):
  return rng.permutation(np.arange(n) % k)


# ----------------------------------------------------------------------------- APTOS 2019


def fundus_image(rng, grade: int, size: int) -> np.ndarray:
  image = np.zeros((size, size, 3), np.uint8)
  disc = _disc_mask(size, size / 2, size / 2, 0.45 * size)
  image[disc] = (150 + rng.integers(-15, 15), 60 + rng.integers(-10, 10), 25)
  radius = max(1.5, size / 28)
  for _ in range(3 * grade):
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.35 * size)
    spot = _disc_mask(size, size / 2 + dist * np.sin(angle), size / 2 + dist * np.cos(angle), radius)
    image[spot] = (250, 230, 90)
  noise = rng.integers(-8, 9, image.shape)
  return np.clip(image.astype(np.int16) + noise * disc[..., None], 0, 255).astype(np.uint8)


def aptos2019(root: str, num_images: int = 40, size: int = 64, seed: int = 0) -> str:
  """Kaggle APTOS 2019 layout: train.csv + train_images/<id_code>.png (RGB)."""
  rng = np.random.default_rng(seed)
  grades = _balanced(rng, num_images, 5)
  rows = []
  for i, grade in enumerate(grades):
    id_code = f"{rng.integers(16 ** 11, 16 ** 12):012x}"
    _save(fundus_image(rng, int(grade), size), os.path.join(root, "train_images", id_code + ".png"))
    rows.append((id_code, int(grade)))
  _write_csv(os.path.join(root, "train.csv"), ["id_code", "diagnosis"], rows)
  return root


# ----------------------------------------------------------------------------- ISIC 2019


def isic2019(root: str, num_images: int = 48, size: int = 64, seed: int = 0, metadata: bool = True) -> str:
  """ISIC 2019 layout: ground-truth CSV, optional metadata CSV, ISIC_2019_Training_Input/*.jpg.

  Images come in lesions of one or two images of the same class (metadata `lesion_id`).
  """
  from mfjax.data.isic2019 import CLASS_NAMES, GROUND_TRUTH, METADATA
  rng = np.random.default_rng(seed)
  classes = _balanced(rng, num_images, len(CLASS_NAMES))
  truth, meta = [], []
  lesion, left_in_lesion = -1, 0
  for i, k in enumerate(classes):
    if left_in_lesion == 0 or classes[i - 1] != k:
      lesion, left_in_lesion = lesion + 1, int(rng.integers(1, 3))
    left_in_lesion -= 1
    name = f"ISIC_{i:07d}"
    skin = np.array((225, 180, 150)) + rng.integers(-15, 15, 3)
    image = np.broadcast_to(skin, (size, size, 3)).astype(np.uint8).copy()
    yy, xx = np.mgrid[:size, :size]
    a, b = rng.uniform(0.2, 0.35) * size, rng.uniform(0.15, 0.3) * size
    inside = ((yy - size / 2) / a) ** 2 + ((xx - size / 2) / b) ** 2 <= 1
    image[inside] = ISIC_COLOURS[k]
    _save(image, os.path.join(root, "ISIC_2019_Training_Input", name + ".jpg"), quality=92)
    truth.append([name] + [f"{float(j == k):.1f}" for j in range(len(CLASS_NAMES))] + ["0.0"])
    age = "" if rng.random() < 0.1 else f"{5 * int(rng.integers(4, 17)):.1f}"
    meta.append([name, age, str(rng.choice(["anterior torso", "head/neck", "lower extremity", ""])),
                 f"BCN_{lesion:07d}", str(rng.choice(["male", "female"]))])
  _write_csv(os.path.join(root, GROUND_TRUTH), ["image", *CLASS_NAMES, "UNK"], truth)
  if metadata:
    _write_csv(os.path.join(root, METADATA), ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta)
  return root


# ----------------------------------------------------------------------------- CheXpert


def chest_image(rng, codes, size: int) -> np.ndarray:
  image = np.linspace(30, 80, size, dtype=np.float64)[None, :].repeat(size, 0)
  image += rng.normal(0, 4, (size, size))
  cell = size // 4
  for j, code in enumerate(codes):
    if code in (1, -1):
      r, c = divmod(j, 4)
      image[r * cell + 2:(r + 1) * cell - 2, c * cell + 2:(c + 1) * cell - 2] = 240 if code == 1 else 150
  return np.clip(image, 0, 255).astype(np.uint8)


def chexpert(root: str, num_patients: int = 16, size: int = 64, seed: int = 0, small: bool = True,
             num_valid_patients: int = 4) -> str:
  """CheXpert layout: CheXpert-v1.0[-small]/{train,valid}.csv and patient/study/view JPEGs."""
  from mfjax.data.chexpert import COLUMNS, OBSERVATIONS
  rng = np.random.default_rng(seed)
  release = "CheXpert-v1.0-small" if small else "CheXpert-v1.0"
  for split, first, count in (("train", 1, num_patients), ("valid", 64541, num_valid_patients)):
    rows = []
    for p in range(first, first + count):
      for study in range(1, int(rng.integers(1, 4)) + 1):
        for view in range(1, int(rng.integers(1, 3)) + 1):
          frontal = view == 1
          rel = f"{release}/{split}/patient{p:05d}/study{study}/view{view}_{'frontal' if frontal else 'lateral'}.jpg"
          codes = rng.choice([1, 0, -1, -2], size=len(OBSERVATIONS), p=[0.25, 0.2, 0.1, 0.45])
          if split == "valid":
            codes = np.where(codes < 0, 0, codes)  # the official validation set has no uncertainty
          _save(chest_image(rng, codes, size), os.path.join(root, rel), quality=92)
          cells = ["" if c == -2 else f"{float(c):.1f}" for c in codes]
          rows.append([rel, str(rng.choice(["Male", "Female"])), str(int(rng.integers(18, 90))),
                       "Frontal" if frontal else "Lateral",
                       str(rng.choice(["AP", "PA"])) if frontal else "", *cells])
    _write_csv(os.path.join(root, release, f"{split}.csv"), list(COLUMNS), rows)
  return root


# ----------------------------------------------------------------------------- CBIS-DDSM


def mammogram(rng, kind: str, malignant: bool, size: int, bits: int = 16) -> np.ndarray:
  """A breast-shaped region with a lesion (kind: mass, calc or none), as uint16 (or uint8)."""
  top = (1 << bits) - 1
  yy, xx = np.mgrid[:size, :size]
  breast = ((xx / (0.7 * size)) ** 2 + ((yy - size / 2) / (0.48 * size)) ** 2) <= 1
  image = np.where(breast, 0.3, 0.02) + rng.normal(0, 0.02, (size, size))
  cy, cx = rng.uniform(0.35, 0.65) * size, rng.uniform(0.15, 0.45) * size
  if kind == "mass":
    radius = size * (0.09 if malignant else 0.07)
    image[_disc_mask(size, cy, cx, radius)] = 0.95 if malignant else 0.5
    if malignant:  # spicules
      for angle in np.linspace(0, np.pi, 4, endpoint=False) + rng.uniform(0, np.pi / 4):
        for t in np.linspace(-2.2 * radius, 2.2 * radius, 4 * size):
          y, x = int(cy + t * np.sin(angle)), int(cx + t * np.cos(angle))
          if 0 <= y < size and 0 <= x < size:
            image[y, x] = 0.9
  elif kind == "calc":
    for _ in range(12 if malignant else 4):
      y = int(np.clip(cy + rng.normal(0, size / 20), 0, size - 1))
      x = int(np.clip(cx + rng.normal(0, size / 20), 0, size - 1))
      image[y, x] = 1.0 if malignant else 0.6
  return (np.clip(image, 0, 1) * top).astype(np.uint16 if bits > 8 else np.uint8)


def write_dicom(path: str, pixels: np.ndarray, uid_seed: int, monochrome1: bool = False):
  """A minimal valid mammography DICOM (explicit VR little endian, uncompressed)."""
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
  uid = f"1.2.826.0.1.3680043.8.498.{uid_seed}"
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, uid, "MG"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
  bits = 8 * pixels.dtype.itemsize
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
  ds.PixelData = (pixels.max() - pixels if monochrome1 else pixels).tobytes()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def cbis_ddsm(root: str, num_patients: int = 14, size: int = 64, seed: int = 0, dicom: bool = True) -> str:
  """Official CBIS-DDSM layout: four case-description CSVs + TCIA DICOM folders.

  dicom=False writes converted `converted/<folder>.png` 8-bit files instead. Each full
  mammogram also gets an ROI-crop folder (`<folder>_1`), which the builder must not pick. Two
  extra patients have a mammogram in both CSV families.
  """
  rng = np.random.default_rng(seed)
  header = {
      "mass": ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"],
      "calc": ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"],
  }
  tables = {(f, s): [] for f in ("mass", "calc") for s in ("train", "test")}
  uid = seed * 100000

  def mammograms(p, family, split, breast, malignant, pixels_of=None):
    nonlocal uid
    written = {}
    for view in ("CC", "MLO"):
      key = f"{family.capitalize()}-{'Training' if split == 'train' else 'Test'}_P_{p:05d}_{breast}_{view}"
      uid += 3
      series = f"1.3.6.1.4.1.9590.100.1.2.{uid}/1.3.6.1.4.1.9590.100.1.2.{uid + 1}"
      pixels = written[view] = (pixels_of[view] if pixels_of else
                                mammogram(rng, family, malignant, size, bits=16 if dicom else 8))
      if dicom:
        write_dicom(os.path.join(root, "CBIS-DDSM", key, f"07-20-2016-DDSM-{uid}", f"1.000000-full-{uid}",
                                 "1-1.dcm"), pixels, uid, monochrome1=p % 5 == 0)
        write_dicom(os.path.join(root, "CBIS-DDSM", key + "_1", f"08-29-2017-DDSM-{uid}",
                                 f"1.000000-ROI-{uid}", "1-1.dcm"), pixels[:size // 2, :size // 2], uid + 2)
      else:
        _save(pixels, os.path.join(root, "converted", key + ".png"))
      for abnormality in range(1, int(rng.integers(1, 3)) + 1):
        pathology = "MALIGNANT" if malignant and abnormality == 1 else str(
            rng.choice(["BENIGN", "BENIGN_WITHOUT_CALLBACK"]))
        kind = ["OVAL", "CIRCUMSCRIBED"] if family == "mass" else ["PLEOMORPHIC", "CLUSTERED"]
        tables[(family, split)].append([  # TCIA's path cells end in a line break
            f"P_{p:05d}", int(rng.integers(1, 5)), breast, view, abnormality,
            "mass" if family == "mass" else "calcification", *kind, int(rng.integers(2, 6)), pathology,
            int(rng.integers(1, 6)), f"{key}/{series}/000000.dcm\n",
            f"{key}_{abnormality}/{series}/000000.dcm\n", f"{key}_{abnormality}/{series}/000001.dcm\n"])
    return written

  for p in range(1, num_patients + 1):
    split = "test" if p % 4 == 0 else "train"
    for breast in rng.permutation(["LEFT", "RIGHT"])[:int(rng.integers(1, 3))]:
      family = "mass" if rng.random() < 0.5 else "calc"
      mammograms(p, family, split, breast, malignant=bool(rng.random() < 0.5))
  # As in the release, some mammograms hold a mass and a calcification: one image, two folders. The
  # second patient's is in the mass Training CSV and the calcification Test CSV, her other breast in
  # the mass Training CSV only.
  both = mammograms(num_patients + 1, "mass", "train", "LEFT", malignant=False)
  mammograms(num_patients + 1, "calc", "train", "LEFT", malignant=True, pixels_of=both)
  both = mammograms(num_patients + 2, "mass", "train", "RIGHT", malignant=True)
  mammograms(num_patients + 2, "calc", "test", "RIGHT", malignant=False, pixels_of=both)
  mammograms(num_patients + 2, "mass", "train", "LEFT", malignant=False)
  for (family, split), rows in tables.items():
    _write_csv(os.path.join(root, f"{family}_case_description_{split}_set.csv"), header[family], rows)
  return root


def ddsm_lists(root: str, num_cases: int = 18, size: int = 64, seed: int = 0) -> str:
  """The paper's DDSM layout: ddsm_raw_image_lists/{train,val,test}.txt + ddsm_raw/*.png."""
  rng = np.random.default_rng(seed)
  lists = {"train.txt": [], "val.txt": [], "test.txt": []}
  kinds = _balanced(rng, num_cases, 3)
  for case, kind in enumerate(kinds):
    label = ("normal", "benign", "cancer")[kind]
    volume = "ABCD"[case % 4]
    list_name = ("train.txt", "train.txt", "train.txt", "val.txt", "test.txt")[case % 5]
    for breast in ("LEFT", "RIGHT"):
      for view in ("CC", "MLO"):
        rel = f"{label}_{case % 16:02d}/{label}_{case % 16:02d}_{volume}_{1000 + case:04d}_1.{breast}_{view}.png"
        pixels = mammogram(rng, "none" if kind == 0 else "mass", kind == 2, size, bits=8)
        _save(pixels, os.path.join(root, "ddsm_raw", rel))
        lists[list_name].append(rel)
  for name, paths in lists.items():
    os.makedirs(os.path.join(root, "ddsm_raw_image_lists"), exist_ok=True)
    with open(os.path.join(root, "ddsm_raw_image_lists", name), "w") as f:
      f.write("\n".join(paths) + "\n")
  return root


# ----------------------------------------------------------------------------- your own CSV


def bars_image(rng, rows_lit, size: int, channels: int = 3) -> np.ndarray:
  image = rng.integers(0, 40, (size, size)).astype(np.uint8)
  band = max(1, size // 8)
  for r in rows_lit:
    image[r * band + 1:(r + 1) * band - 1, size // 8:-size // 8] = 230
  return np.repeat(image[..., None], 3, -1) if channels == 3 else image


def csv_images(root: str, num_images: int = 36, size: int = 48, seed: int = 0, multi_label: bool = False,
               class_names=("benign", "malignant", "normal")) -> str:
  """labels.csv (image, label | one 0/1 column per label, patient) + images/<...>.png."""
  rng = np.random.default_rng(seed)
  rows = []
  k = len(class_names)
  classes = _balanced(rng, num_images, k)
  for i in range(num_images):
    rel = f"images/{i % 3}/img_{i:04d}.png"
    if multi_label:
      lit = np.flatnonzero(rng.random(k) < 0.4)
      rows.append([rel, *[int(j in lit) for j in range(k)], f"p{i // 2}"])
    else:
      lit = range(int(classes[i]) + 1)
      rows.append([rel, class_names[classes[i]], f"p{i // 2}"])
    _save(bars_image(rng, lit, size), os.path.join(root, rel))
  header = ["image", *class_names, "patient"] if multi_label else ["image", "label", "patient"]
  _write_csv(os.path.join(root, "labels.csv"), header, rows)
  return root


# ----------------------------------------------------------------------------- nnU-Net CT


def ct_volume(rng, shape) -> tuple[np.ndarray, np.ndarray]:
  """(HU (X, Y, Z) float32, labels uint8): air, an elliptic body, a liver and two kidneys."""
  x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
  body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
  image = np.where(body, 0.0, -1000.0)
  labels = np.zeros(shape, np.uint8)
  lx, ly = rng.uniform(-0.45, -0.25), rng.uniform(-0.2, 0.1)
  liver = ((x - lx) / 0.3) ** 2 + ((y - ly) / 0.3) ** 2 + (z / 0.9) ** 2 <= 1
  labels[liver & body] = 1
  for side in (-1, 1):
    kx = 0.35 + rng.uniform(-0.05, 0.05) if side > 0 else rng.uniform(-0.1, 0.0)
    kidney = ((x - kx) / 0.12) ** 2 + ((y - 0.35 * side * 0 - 0.3) / 0.12) ** 2 + (z / 0.6) ** 2 <= 1
    labels[kidney & body & ~liver] = 2
  image = image + 100.0 * (labels == 1) + 250.0 * (labels == 2)
  image = image + rng.normal(0, 20, shape)
  return image.astype(np.float32), labels


SPARSE_IGNORE_LABEL = 3  # nnunet_ct(sparse=True)'s ignore label


def nnunet_ct(root: str, num_cases: int = 8, shape=(48, 48, 10), seed: int = 0,
              name: str = "Dataset990_SynthCT", test_cases: int = 0, regions: bool = False,
              sparse: bool = False, modality: str = "CT", channels: tuple[str, ...] = (),
              slice_mm: float = 3.0) -> str:
  """An nnU-Net v2 raw dataset folder root/name (dataset.json, imagesTr, labelsTr[, imagesTs]).

  In-plane spacing varies between 0.7 and 0.9 mm, slices lie `slice_mm` apart (3 mm: more than
  3x the in-plane spacing, which nnU-Net resamples slice by slice), and every third case is
  stored in LPS orientation, so readers must resample and reorient. Label values: 1 liver, 2 kidney; with
  `regions`, dataset.json declares them as nested regions ("organs" = [1, 2] containing
  "kidney" = [2]), as KiTS23 does. With `sparse`, the training labels are sparse annotations:
  every other axial slice and an in-plane rim of the rest carry nnU-Net's ignore label 3. With a
  `modality` other than CT, the volumes are MR-like: positive intensities inside the body and
  exactly 0 outside it, as skull-stripped or masked MR, so nnU-Net's preprocessing crops them to
  about 55 % of their size and z-scores within the body only. `channels` (e.g. ("T2", "ADC")) writes
  one such MR-like file per channel, CASE_0000, CASE_0001, ...: channel k > 0 shows the organs with
  another contrast (the kidney darker than the liver) on another intensity scale."""
  from mfjax.data import volumes
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, name)
  for i in range(num_cases + test_cases):
    image, labels = ct_volume(rng, shape)
    names = channels or (modality,)
    if modality.upper() != "CT" or channels:
      image = np.where(image > -500, image + 1100, 0.0)
    images = [image] + [np.where(image > 0, (k + 1) * (1500.0 + 300.0 * (labels == 1) - 250.0 * (labels == 2))
                                 + rng.normal(0, 30, shape), 0.0) for k in range(1, len(names))]
    spacing = (rng.uniform(0.7, 0.9), rng.uniform(0.7, 0.9), float(slice_mm))
    case = f"synth_{i:03d}"
    split = "Tr" if i < num_cases else "Ts"
    affine = np.diag([*spacing, 1.0])
    if i % 3 == 2:  # LPS: flip the first two axes in the file, the affine says so
      images, labels = [channel[::-1, ::-1] for channel in images], labels[::-1, ::-1]
      affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
      affine[:2, 3] = [(shape[0] - 1) * spacing[0], (shape[1] - 1) * spacing[1]]
    for k, channel in enumerate(images):
      volumes.write_volume(os.path.join(folder, f"images{split}", f"{case}_{k:04d}.nii.gz"),
                           np.round(channel).astype(np.int16), affine=affine)
    if sparse and split == "Tr":
      labels = labels.copy()
      rim = max(1, shape[0] // 8)
      labels[..., 1::2] = SPARSE_IGNORE_LABEL
      labels[:rim], labels[-rim:], labels[:, :rim], labels[:, -rim:] = (SPARSE_IGNORE_LABEL,) * 4
    volumes.write_volume(os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), labels, affine=affine)
  meta = {"channel_names": {str(k): name for k, name in enumerate(names)},
          "labels": {"background": 0, "liver": 1, "kidney": 2},
          "numTraining": num_cases, "file_ending": ".nii.gz", "name": name}
  if regions:
    meta.update(labels={"background": 0, "organs": [1, 2], "kidney": 2}, regions_class_order=[1, 2])
  if sparse:
    meta["labels"]["ignore"] = SPARSE_IGNORE_LABEL
  with open(os.path.join(folder, "dataset.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return folder
