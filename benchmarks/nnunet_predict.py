r"""Predicting a folder of CT volumes with a MedDINOv3 network trained by nnU-Net, end to end:

  mfjax    `segment.import_nnunet` once, then `segment.predict_folder` (what `mfjax segment
           --predict` runs: restore, compile, read, preprocess, sliding window with the flips and
           the Gaussian inside one jitted call per batch of tiles, resample, write);
  nnU-Net  nnunetv2's nnUNetPredictor with the same weights in torch (`predict_from_files`, what
           `nnUNetv2_predict` runs: worker processes preprocess and export while the main one
           predicts, one tile at a time);

on the same machine, in the same run, on the same volumes. Seconds per folder, medians of
`--rounds` after an untimed round, the two timed in turns (`common.interleave`); `agree` is the
share of voxels both label alike. With `--save-probabilities` both also write each case's
probabilities (CASE.npz, CASE.pkl), as `nnUNetv2_predict --save_probabilities` and `mfjax segment
--predict --save-probabilities` do; `probabilities` is then the largest difference between them.

  PYTHONPATH=. python -m benchmarks.nnunet_predict --cases 2 --size 512 --slices 8 --patch 512

The network is a random MedDINOv3 ViT-B/16 + PatchDecode (`benchmarks/nnunet_reference.py`),
float32 on both sides; RoPE in float32 as timm's.
"""
import argparse
import os
import tempfile

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("volumes", "volumes"), ("patch", "patch"), ("tiles", "tiles"),
           ("nnU-Net s", "nnunet_s"), ("mfjax s", "mfjax_s"), ("speed-up", "speedup"), ("agree", "agree"),
           ("probabilities", "probabilities")]


def make_inputs(folder: str, cases: int, size: int, slices: int, spacing: float) -> list[str]:
  import numpy as np
  from benchmarks import nnunet_reference
  affine = np.array([[-spacing, 0, 0, 0], [0, -spacing, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
  return [nnunet_reference.ct_volume(os.path.join(folder, f"case{k:03d}_0000.nii.gz"), (size, size, slices), affine,
                                     seed=k) for k in range(cases)]


def nnunet_way(plans, net, dataset, device: str, inputs: list[str], out_dir: str, workers: int,
               save_probabilities: bool):
  import torch
  from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
  from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
  from benchmarks.nnunet_reference import TRAINER
  predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                              perform_everything_on_device=device == "cuda", device=torch.device(device),
                              verbose=False, verbose_preprocessing=False, allow_tqdm=False)
  manager = PlansManager(plans)
  predictor.manual_initialization(net.to(device), manager, manager.get_configuration("2d"), [net.state_dict()],
                                  dataset, TRAINER, (0, 1))
  outputs = [os.path.join(out_dir, os.path.basename(p)[: -len("_0000.nii.gz")]) for p in inputs]
  return lambda: predictor.predict_from_files([[p] for p in inputs], outputs, save_probabilities, True, workers,
                                              workers)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", type=int, default=2, help="volumes in the folder")
  parser.add_argument("--size", type=int, default=512, help="in-plane voxels of each volume")
  parser.add_argument("--slices", type=int, default=8)
  parser.add_argument("--spacing", type=float, default=0.8, help="in-plane spacing of the volumes, mm")
  parser.add_argument("--target-spacing", type=float, default=0.8, help="the 2-D configuration's spacing, mm")
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--workers", type=int, default=2, help="nnU-Net's preprocessing and export processes")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--save-probabilities", action="store_true", help="both also write CASE.npz and CASE.pkl")
  parser.add_argument("--out")
  args, _ = common.parse_args(parser, argv)
  import nibabel as nib
  import numpy as np
  from benchmarks import nnunet_reference
  from mfjax.evals import segmentation
  from mfjax.train import segment

  device = common.torch_device()
  backbone, net = nnunet_reference.random_network()
  plans = nnunet_reference.nnunet_plans([0, 1, 2], (args.target_spacing,) * 2, (args.patch, args.patch))
  with tempfile.TemporaryDirectory() as root:
    inputs = make_inputs(os.path.join(root, "in"), args.cases, args.size, args.slices, args.spacing)
    folder = nnunet_reference.model_folder(root, backbone, net, plans)
    segment.import_nnunet(folder, 0, os.path.join(root, "run"), rope_dtype="float32")
    outs = {name: os.path.join(root, name) for name in ("nnunet", "mfjax")}
    ways = {"nnunet": nnunet_way(plans, net, nnunet_reference.DATASET, device, inputs, outs["nnunet"], args.workers,
                                 args.save_probabilities),
            "mfjax": lambda: segment.predict_folder(os.path.join(root, "run"), os.path.dirname(inputs[0]),
                                                    outs["mfjax"], progress=False,
                                                    save_probabilities=args.save_probabilities)}
    seconds = common.interleave(ways, args.rounds, dict.fromkeys(ways, 1))
    labels = {name: np.concatenate([np.asarray(nib.load(os.path.join(out, name_)).dataobj).ravel()
                                    for name_ in sorted(os.listdir(out)) if name_.endswith(".nii.gz")])
              for name, out in outs.items()}
    probabilities = "not saved"
    if args.save_probabilities:
      cases = sorted(f for f in os.listdir(outs["nnunet"]) if f.endswith(".npz"))
      probabilities = max(float(np.abs(np.load(os.path.join(outs["nnunet"], f))["probabilities"]
                                       - np.load(os.path.join(outs["mfjax"], f))["probabilities"]).max())
                          for f in cases)
      probabilities = f"max diff {probabilities:.1e}"
  median = {name: float(np.median(s)) for name, s in seconds.items()}
  cropped = args.size - 2 * (args.size // 10)  # ct_volume's body, what the crop to nonzero leaves
  resampled = round(cropped * args.spacing / args.target_spacing)
  tiles = len(segmentation.window_starts(resampled, args.patch)) ** 2
  common.emit({**common.environment(), "benchmark": "nnunet_predict", "torch_device": device,
               "volumes": f"{args.cases} × {args.size}²×{args.slices}", "patch": f"{args.patch}²",
               "tiles": f"{tiles}/slice × 4 flips", "rounds": args.rounds,
               "nnunet_s": float(f"{median['nnunet']:.4g}"), "mfjax_s": float(f"{median['mfjax']:.4g}"),
               "speedup": f"{median['nnunet'] / median['mfjax']:.2f}x",
               "agree": f"{float(np.mean(labels['nnunet'] == labels['mfjax'])):.5f}", "probabilities": probabilities},
              COLUMNS, args.out)


if __name__ == "__main__":
  main()
