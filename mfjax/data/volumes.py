"""CT/MRI volumes on disk: NIfTI (.nii, .nii.gz) read into canonical (RAS+) voxel order.

`read_volume(path)` returns (array (X, Y, Z) float32, spacing (3,) mm). After reorientation to
the closest canonical orientation, axis 2 runs inferior -> superior, so `array[:, :, k]` is the
k-th axial slice whatever orientation the scanner wrote. Labels are read with `read_labels`,
which insists on whole numbers.
"""
import os

import numpy as np

from mfjax.config import DataError

NIFTI_ENDINGS = (".nii.gz", ".nii")


class VolumeError(DataError):
  pass


def _load(path: str, canonical: bool = True):
  import nibabel as nib
  path, image = _load_header(path)
  try:
    image = nib.as_closest_canonical(image) if canonical else image
  except Exception as e:  # nibabel raises ImageFileError, gzip / EOF / struct errors
    raise VolumeError(f"{path}: not a readable NIfTI volume ({type(e).__name__}: {e})") from e
  if len(image.shape) != 3:
    if len(image.shape) == 4 and image.shape[3] == 1:
      image = image.slicer[..., 0]
    else:
      raise VolumeError(f"{path}: expected a 3-D volume, got shape {image.shape}")
  return path, image


def read_volume(path: str, canonical: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(voxels (X, Y, Z) float32 with the header's scaling applied, spacing (3,) float64 in mm).
  `canonical=False`: in the file's own voxel order (i, j, k), as SimpleITK stores it (its array is
  this one transposed, (k, j, i)), with the spacing of those axes."""
  path, image = _load(path, canonical)
  try:
    data = np.asarray(image.get_fdata(dtype=np.float32))
  except Exception as e:
    raise VolumeError(f"{path}: the voxel data cannot be read ({type(e).__name__}: {e})") from e
  if not np.isfinite(data).all():
    raise VolumeError(f"{path}: {int((~np.isfinite(data)).sum())} voxels are NaN or infinite")
  spacing = np.asarray(image.header.get_zooms()[:3], np.float64)
  if (spacing <= 0).any():
    raise VolumeError(f"{path}: voxel spacing {tuple(spacing)} is not positive")
  return data, spacing


def check_header(path: str) -> None:
  """What the header alone can tell: a readable NIfTI holding one 3-D volume with positive spacing.
  Reads no voxels (reorienting a non-RAS file would read them all): data cut short is found when read."""
  path, image = _load(path, canonical=False)
  spacing = np.asarray(image.header.get_zooms()[:3], np.float64)
  if not (np.isfinite(spacing).all() and (spacing > 0).all()):
    raise VolumeError(f"{path}: voxel spacing {tuple(spacing)} is not positive")


def read_labels(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(labels (X, Y, Z) uint8, spacing (3,)): a segmentation map of whole-number class ids 0..255."""
  data, spacing = read_volume(path)
  labels = np.rint(data)
  bad = (np.abs(labels - data) > 1e-3) | (labels < 0) | (labels > 255)
  if bad.any():
    examples = ", ".join(f"{v:g}" for v in np.unique(data[bad])[:5])
    raise VolumeError(f"{path}: a label map must hold whole numbers in 0..255; {int(bad.sum())} voxel(s) do not "
                      f"({examples}{', ...' if len(np.unique(data[bad])) > 5 else ''}, first at voxel "
                      f"{tuple(int(i) for i in np.argwhere(bad)[0])})")
  return labels.astype(np.uint8), spacing


def write_volume(path: str, data: np.ndarray, spacing=(1.0, 1.0, 1.0), affine=None) -> str:
  """Write (X, Y, Z) voxels as NIfTI (default: RAS+ with `spacing` mm, else `affine`); the dtype is kept."""
  import nibabel as nib
  affine = np.diag([*map(float, spacing), 1.0]) if affine is None else np.asarray(affine, np.float64)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = nib.Nifti1Image(np.asarray(data), affine)  # the header's zooms follow the affine
  folder, name = os.path.split(path)
  ending = nifti_ending(name)
  # Hidden, so that a kill leaves nothing a listing of *.nii.gz takes for a case; nibabel picks gzip by the ending.
  partial = os.path.join(folder, "." + name[: len(name) - len(ending)] + ".partial" + ending)
  nib.save(image, partial)
  os.replace(partial, path)  # a volume is there whole or not at all
  return path


def nifti_ending(name: str) -> str:
  """The NIfTI ending of `name` (.nii.gz or .nii); "" for another file."""
  return next((e for e in NIFTI_ENDINGS if name.endswith(e)), "")


def strip_ending(name: str) -> str:
  return name[: len(name) - len(nifti_ending(name))]


def volume_files(folder: str, endings=NIFTI_ENDINGS) -> list[str]:
  """The names of `folder`'s volumes, sorted; hidden files (a write in progress, `write_volume`) left out."""
  return sorted(f for f in os.listdir(folder) if f.endswith(endings) and not f.startswith("."))


def read_spacing(path: str) -> np.ndarray:
  """The canonical-order (X, Y, Z) voxel spacing of a NIfTI file, from its header alone."""
  import nibabel as nib
  path, image = _load_header(path)
  ornt = nib.orientations.io_orientation(image.affine)
  spacing = np.zeros(3)
  for axis, (target, _) in enumerate(ornt[:3]):
    spacing[int(target)] = image.header.get_zooms()[axis]
  return spacing


def _load_header(path: str):
  import nibabel as nib
  path = os.path.expanduser(str(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: volume not found")
  try:
    return path, nib.load(path)
  except Exception as e:
    raise VolumeError(f"{path}: not a readable NIfTI volume ({type(e).__name__}: {e})") from e


def file_affine(path: str) -> np.ndarray:
  """The voxel-to-world affine of the file's own voxel order (`read_volume(path, canonical=False)`)."""
  return np.asarray(_load_header(path)[1].affine, np.float64)


def canonical_affine(path: str) -> np.ndarray:
  """The voxel-to-world affine of `read_volume(path)`'s array (for writing predictions back)."""
  return canonical_geometry(path)[1]


def canonical_geometry(path: str) -> tuple[tuple[int, ...], np.ndarray]:
  """(shape, voxel-to-world affine) of `read_volume(path)`'s array, from the header alone."""
  import nibabel as nib
  path, image = _load_header(path)
  if not (len(image.shape) == 3 or (len(image.shape) == 4 and image.shape[3] == 1)):  # as _load
    raise VolumeError(f"{path}: expected a 3-D volume, got shape {image.shape}")
  shape = image.shape[:3]
  ornt = nib.orientations.io_orientation(image.affine)
  canonical_shape = tuple(int(shape[i]) for i in np.argsort(ornt[:, 0]))
  return canonical_shape, image.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
