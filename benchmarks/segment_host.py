r"""Host time of two steps of `mfjax segment`, each against nnU-Net's way of doing it:

  labels          resampling a label volume in-plane (preprocessing): mfjax's four-neighbour
                  computation (`nnunet.resample_labels_inplane`) against nnU-Net's
                  resize_segmentation (batchgenerators: one linear resampling per label value and
                  slice, the largest wins);
  postprocessing  `segmentation.determine_postprocessing` over validation cases read from .nii.gz:
                  every class's step scored in one reading (plain labels) against one reading per
                  step (nnU-Net's way, which regions still take).

  PYTHONPATH=. python -m benchmarks.segment_host --size 512 --to 440 --slices 60 --classes 16 \
      --cases 8 --case-size 256 --case-slices 80

Both ways give the same labels and the same postprocessing steps (checked in each row). They are
timed in turns after one untimed round (`common.interleave`), medians of `--rounds`.
"""
import argparse
import functools
import os
import tempfile

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("step", "step"), ("input", "input"), ("classes", "classes"),
           ("nnU-Net's way s", "nnunet_s"), ("mfjax s", "mfjax_s"), ("speed-up", "speedup"), ("same", "same")]


def blob_labels(rng, shape, classes: int, stray_fraction: float = 0.0):
  """(X, Y, Z) uint8 labels: one box per class value, and stray voxels of random classes."""
  import numpy as np
  labels = np.zeros(shape, np.uint8)
  half = [max(1, s // 10) for s in shape]
  for value in range(1, classes):
    centre = [int(rng.integers(h, s - h + 1)) for h, s in zip(half, shape)]
    labels[tuple(slice(c - h, c + h) for c, h in zip(centre, half))] = value
  strays = rng.random(shape) < stray_fraction
  labels[strays] = rng.integers(1, classes, int(strays.sum()))
  return labels


def time_label_resampling(args, rng) -> dict:
  import numpy as np
  from benchmarks import torch_reference
  from mfjax.data import nnunet
  labels = blob_labels(rng, (args.size, args.size, args.slices), args.classes).astype(np.int16)
  labels[: args.size // 20] = nnunet.NONZERO_LABEL   # a cropped-off rim, as preprocessing sees
  shape = (args.to, args.to)
  ways = {"nnunet": lambda: np.stack([torch_reference.resize_segmentation(labels[:, :, k], shape)
                                      for k in range(labels.shape[2])], axis=-1),
          "mfjax": lambda: nnunet.resample_labels_inplane(labels, shape)}
  outputs, times = _timed(ways, args.rounds)
  return {"step": "labels", "input": f"{args.size}²×{args.slices} -> {args.to}²",
          "same": bool(np.array_equal(outputs["nnunet"], outputs["mfjax"])), **times}


def time_postprocessing(args, rng) -> dict:
  from mfjax.data import volumes
  from mfjax.evals import segmentation
  shape = (args.case_size, args.case_size, args.case_slices)
  with tempfile.TemporaryDirectory() as folder:
    cases = []
    for k in range(args.cases):
      truth = blob_labels(rng, shape, args.classes)
      prediction = truth.copy()
      strays = rng.random(shape) < 1e-3
      prediction[strays] = rng.integers(1, args.classes // 2 + 1, int(strays.sum()))  # strays of half the classes
      files = [os.path.join(folder, f"{k}_{kind}.nii.gz") for kind in ("prediction", "truth")]
      for path, labels in zip(files, (prediction, truth)):
        volumes.write_volume(path, labels)
      cases.append(tuple(functools.partial(lambda path: volumes.read_labels(path)[0], path) for path in files))
    targets = {f"class{v}": (v,) for v in range(1, args.classes)}
    search = lambda one_pass: segmentation.determine_postprocessing(cases, targets, list(range(1, args.classes)),
                                                                    log=lambda _: None, one_pass=one_pass)
    outputs, times = _timed({"nnunet": lambda: search(False), "mfjax": lambda: search(True)}, args.rounds)
  return {"step": "postprocessing", "input": f"{args.cases} cases of {args.case_size}²×{args.case_slices}",
          "same": outputs["nnunet"] == outputs["mfjax"], **times}


def _timed(ways: dict, rounds: int) -> tuple[dict, dict]:
  """(each way's output, its median seconds over `rounds`), the ways timed in turns (common.interleave)."""
  import numpy as np
  outputs = {}
  keep = lambda name, fn: lambda: outputs.__setitem__(name, fn())
  seconds = common.interleave({name: keep(name, fn) for name, fn in ways.items()}, rounds,
                              dict.fromkeys(ways, 1))
  median = {name: float(np.median(s)) for name, s in seconds.items()}
  return outputs, {"nnunet_s": float(f"{median['nnunet']:.4g}"), "mfjax_s": float(f"{median['mfjax']:.4g}"),
                   "speedup": f"{median['nnunet'] / median['mfjax']:.1f}x"}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512, help="in-plane size of the label volume to resample")
  parser.add_argument("--to", type=int, default=440, help="its in-plane size after resampling")
  parser.add_argument("--slices", type=int, default=60)
  parser.add_argument("--classes", type=int, default=16, help="label values, background included")
  parser.add_argument("--cases", type=int, default=8, help="validation cases of the postprocessing search")
  parser.add_argument("--case-size", type=int, default=256)
  parser.add_argument("--case-slices", type=int, default=80)
  parser.add_argument("--steps", default="labels,postprocessing")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--out")
  args, _ = common.parse_args(parser, argv)
  import numpy as np
  steps = {"labels": time_label_resampling, "postprocessing": time_postprocessing}
  unknown = [s for s in args.steps.split(",") if s not in steps]
  if unknown:
    parser.error(f"unknown step(s) {', '.join(unknown)}; valid: {', '.join(steps)}")
  for step in args.steps.split(","):
    row = steps[step](args, np.random.default_rng(0))
    common.emit({**common.environment(), "benchmark": "segment_host", "classes": args.classes,
                 "rounds": args.rounds, **row}, COLUMNS, args.out)


if __name__ == "__main__":
  main()
