"""A MedDINOv3 network trained by nnU-Net, imported (`mfjax segment --import-nnunet`) and used to
predict: against nnU-Net's own predictor (nnunetv2's nnUNetPredictor with the same weights in
torch: its reader, preprocessing, sliding window, export), and nnU-Net's readers for the voxel
layout."""
import copy
import json
import itertools
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from benchmarks import nnunet_reference
from benchmarks.nnunet_reference import CLASSES, TRAINER, ct_volume, model_folder, nnunet_plans
from convert.core import ConversionError
from mfjax import cli
from mfjax.config import ConfigError
from mfjax.data import nnunet
from mfjax.evals import segmentation
from mfjax.train import segment


@pytest.fixture(scope="module")
def network():
  return nnunet_reference.random_network()


# The file's axes in a permuted, flipped orientation; slices along the axis of 3 mm.
CASES = {
    "slices along k": ([0, 1, 2], (50, 60, 6), [[0, -0.8, 0, 10], [0.9, 0, 0, -20], [0, 0, 3.0, 5]], (1.0, 1.1)),
    "slices along i": ([2, 0, 1], (6, 50, 60), [[3.0, 0, 0, 1], [0, 0, -0.9, 4], [0, -0.8, 0, -7]], (1.1, 1.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_network_predicts_as_nnunets_predictor(network, tmp_path, case):
  """The same volume through `--import-nnunet` + `--predict` and through nnU-Net's nnUNetPredictor
  with the torch network: the labels agree voxel for voxel (but for exact ties in nnU-Net's
  probabilities), on the input's grid. Covers the reader's voxel order and transpose_forward, the
  crop, CT normalisation, cubic resampling to a non-square 2-D spacing, a non-square patch larger
  than the slice on one axis (nnU-Net pads around the slice) and tiled on the other, Gaussian
  stitching, mirroring over both axes, and the logits resampled back."""
  from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
  from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
  from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
  backbone, net = network
  transpose, shape, affine, spacing_2d = CASES[case]
  plans = nnunet_plans(transpose, spacing_2d, (32, 48))
  folder = model_folder(tmp_path, backbone, net, plans)
  image = ct_volume(str(tmp_path / "in" / "case_0000.nii.gz"), shape, np.array([*affine, [0, 0, 0, 1]], float))
  # timm's DINOv3 computes RoPE in float32 (MedDINOv3's own ran it in bfloat16, the import's default)
  assert cli.main(["segment", "--import-nnunet", folder, "--fold", "0", "--workdir", str(tmp_path / "run"),
                   "--rope-dtype", "float32"]) == 0
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", str(tmp_path / "in"),
                   "--out", str(tmp_path / "out"), "--save-probabilities", "--no-progress"]) == 0
  assert sorted(os.listdir(tmp_path / "out")) == ["case.nii.gz", "case.npz", "case.pkl", "dataset.json", "plans.json"]
  ours = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz"))
  source = sitk.ReadImage(image)
  assert ours.GetSize() == source.GetSize()
  for what in ("GetSpacing", "GetOrigin", "GetDirection"):
    np.testing.assert_allclose(getattr(ours, what)(), getattr(source, what)(), atol=1e-5, err_msg=what)

  predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                              perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                              verbose_preprocessing=False, allow_tqdm=False)
  manager = PlansManager(plans)
  predictor.manual_initialization(net, manager, manager.get_configuration("2d"), [net.state_dict()],
                                  nnunet_reference.DATASET, TRAINER, (0, 1))
  array, properties = SimpleITKIO().read_images([image])
  theirs, probabilities = predictor.predict_single_npy_array(array, properties, None, None, True)
  ours = sitk.GetArrayFromImage(ours)
  assert ours.shape == theirs.shape
  counts = np.bincount(theirs.ravel(), minlength=3) / theirs.size
  assert counts.min() > 0.05, f"a class is (nearly) never predicted: {counts}; the comparison would be weak"
  top2 = np.sort(probabilities, axis=0)[-2:]
  tie = top2[1] - top2[0] < 1e-3  # float32 noise through 12 random blocks: ~1e-4
  differ = ours != theirs
  assert not (differ & ~tie).any(), (f"{int((differ & ~tie).sum())} voxels differ from nnU-Net's prediction "
                                     f"away from ties, first at {np.argwhere(differ & ~tie)[:5].tolist()}")
  assert differ.mean() < 1e-3

  # --save-probabilities: nnU-Net's npz and pkl, which its nnUNetv2_ensemble averages with its own.
  saved = np.load(tmp_path / "out" / "case.npz")["probabilities"]
  assert saved.dtype == np.float32 and saved.shape == probabilities.shape
  np.testing.assert_allclose(saved, probabilities, atol=1e-3)  # 3e-4 measured: nnU-Net sums the logits in float16
  with open(tmp_path / "out" / "case.pkl", "rb") as f:
    saved_properties = pickle.load(f)
  assert set(saved_properties) == set(properties)
  for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
    assert saved_properties[key] == properties[key], key
  np.testing.assert_allclose(saved_properties["spacing"], properties["spacing"])
  for key, value in properties["sitk_stuff"].items():
    np.testing.assert_allclose(saved_properties["sitk_stuff"][key], value, err_msg=key)
  theirs_dir = tmp_path / "nnunet_out"
  os.makedirs(theirs_dir)
  np.savez_compressed(theirs_dir / "case.npz", probabilities=probabilities)
  with open(theirs_dir / "case.pkl", "wb") as f:
    pickle.dump(properties, f)
  from nnunetv2.ensembling.ensemble import ensemble_folders
  ensemble_folders([str(tmp_path / "out"), str(theirs_dir)], str(tmp_path / "ensembled"), num_processes=1)
  ensembled = sitk.ReadImage(str(tmp_path / "ensembled" / "case.nii.gz"))
  for what in ("GetSpacing", "GetOrigin", "GetDirection"):
    np.testing.assert_allclose(getattr(ensembled, what)(), getattr(source, what)(), atol=1e-5, err_msg=what)
  differ = sitk.GetArrayFromImage(ensembled) != theirs
  assert not (differ & ~tie).any()


def _write(path, array, affine):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), path)
  return path


@pytest.mark.parametrize("reader", sorted(nnunet.NNUNET_READERS))
@pytest.mark.parametrize("transpose", [[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]])
def test_voxel_layout_is_nnunets_reader_and_transpose(tmp_path, reader, transpose):
  """`voxel_layout` + `read_channels` give the slices nnU-Net's 2-D configuration sees (its
  reader's (z, y, x) array transposed by transpose_forward, sliced along the first axis), with
  their spacing; `write_prediction` puts labels in that layout back on the input's grid, as
  nnU-Net's export and SimpleITK's writer do."""
  from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
  affine = np.array([[0, 0, -2.0, 30], [0.7, 0, 0, -4], [0, -1.3, 0, 12], [0, 0, 0, 1]])
  values = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  path = _write(str(tmp_path / "case_0000.nii.gz"), values, affine)
  plans = {"transpose_forward": transpose, "voxel_order": "canonical" if nnunet.NNUNET_READERS[reader] else "file"}
  layout = nnunet.voxel_layout(plans)
  ours, spacing = nnunet.read_channels([path], ["CT"], layout)
  array, properties = recursive_find_reader_writer_by_name(reader)().read_images([path])
  theirs = array[0].transpose(transpose)  # what the predictor slices along its first axis
  np.testing.assert_array_equal(ours[..., 0], theirs.transpose(1, 2, 0))
  np.testing.assert_allclose(spacing, np.asarray(properties["spacing"])[transpose][[1, 2, 0]], rtol=1e-6)

  labels = (ours[..., 0] % 7).astype(np.uint8)
  written = segment.write_prediction(str(tmp_path / "out.nii.gz"), labels, path, layout)
  back = sitk.ReadImage(written)
  source = sitk.ReadImage(path)
  expected = labels.transpose(2, 0, 1).transpose(np.argsort(transpose))  # nnU-Net's transpose_backward
  for what in ("GetSpacing", "GetOrigin", "GetDirection"):  # every layout writes on the input's own grid
    np.testing.assert_allclose(getattr(back, what)(), getattr(source, what)(), atol=1e-5, err_msg=what)
  reread, _ = recursive_find_reader_writer_by_name(reader)().read_seg(written)
  np.testing.assert_array_equal(reread[0], expected)  # its reader gives back the labels as it gave the input
  if reader != "NibabelIOWithReorient":
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)


def test_sliding_window_pads_around_a_small_slice_as_nnunet():
  """A slice smaller than the patch sits in the middle of the padded tile (nnU-Net's pad_nd_image,
  the odd pixel after), which a position-dependent network sees."""
  from acvl_utils.cropping_and_padding.padding import pad_nd_image
  rng = np.random.default_rng(0)
  slices = rng.standard_normal((2, 21, 30)).astype(np.float32)
  ramp = np.linspace(-1, 1, 32 * 48, dtype=np.float32).reshape(32, 48)
  positional = lambda images: images * ramp[None, :, :, None]
  ours = segmentation.predict_slices(positional, slices, (32, 48), 1, batch_size=2)
  padded, slicer = pad_nd_image(slices[:, None], (32, 48), "constant", {"constant_values": 0}, True)
  expected = (padded[:, 0] * ramp)[:, None][slicer]
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_mirror_flips_are_nnunets_axis_combinations():
  assert segmentation.mirror_flips(True) == segmentation.mirror_flips((0, 1)) == [(), (1,), (2,), (1, 2)]
  assert segmentation.mirror_flips([1]) == [(), (2,)]
  assert segmentation.mirror_flips(False) == segmentation.mirror_flips(()) == [()]
  with pytest.raises(ValueError, match="axes 0 and 1"):
    segmentation.mirror_flips((2,))


def test_import_problems_name_the_file_or_field(network, tmp_path, capsys):
  backbone, net = network
  plans = nnunet_plans([0, 1, 2], (1.0, 1.0), (32, 32))
  folder = model_folder(tmp_path / "good", backbone, net, plans)
  workdirs = (str(tmp_path / f"run{i}") for i in itertools.count())
  run = lambda folder: segment.import_nnunet(folder, 0, next(workdirs))
  with pytest.raises(ConfigError, match="fold_3/checkpoint_final.pth not found"):
    segment.import_nnunet(folder, 3, str(tmp_path / "run_missing"))

  def variant(name, plans=plans, **kw):
    return model_folder(tmp_path / name, backbone, net, plans, **kw)

  three_d = copy.deepcopy(plans)
  three_d["configurations"]["2d"]["patch_size"] = [6, 32, 32]
  with pytest.raises(nnunet.DatasetError, match=r"patch_size \[6, 32, 32\]: mfjax predicts with 2-D"):
    run(variant("3d", three_d))
  tiff = {**plans, "image_reader_writer": "Tiff3DIO"}
  with pytest.raises(nnunet.DatasetError, match="image_reader_writer 'Tiff3DIO'"):
    run(variant("tiff", tiff))
  nearest = copy.deepcopy(plans)
  nearest["configurations"]["2d"]["resampling_fn_data_kwargs"]["order"] = 0
  with pytest.raises(nnunet.DatasetError, match="2d.resampling_fn_data"):
    run(variant("order0", nearest))
  inherited = copy.deepcopy(plans)
  inherited["configurations"]["2d_896"] = {"inherits_from": "2d_missing", "patch_size": [896, 896]}
  with pytest.raises(nnunet.DatasetError, match="inherits from '2d_missing'"):
    nnunet.nnunet_configuration(inherited, "2d_896", "plans.json")
  inherited["configurations"]["2d_896"]["inherits_from"] = "2d"
  assert nnunet.nnunet_configuration(inherited, "2d_896", "plans.json")["spacing"] == [1.0, 1.0]
  more = {**nnunet_reference.DATASET, "labels": {**CLASSES, "spleen": 3}}
  with pytest.raises(ConfigError, match="predicts 3 channels, but .*dataset.json's labels need 4"):
    run(variant("classes", dataset=more))
  with pytest.raises(ConversionError, match=r"(?s)unexpected keys.*input_adapter\.weight"):
    run(variant("adapter", extra_weights={"input_adapter.weight": torch.eye(3)[..., None, None]}))
  with pytest.raises(ConversionError, match="takes 3072 channels, but the backbone's interaction blocks give 2304"):
    segment.import_nnunet(folder, 0, str(tmp_path / "run_indices"), "checkpoint_final.pth", (3, 7, 11))
  assert cli.main(["segment", "--import-nnunet", folder, "--workdir", str(tmp_path / "run_cli"),
                   "--interaction-indices", "2,5,8,12"]) == 2
  assert "blocks [12] do not exist" in capsys.readouterr().err
  assert cli.main(["segment", "--import-nnunet", folder, "--workdir", str(tmp_path / "run_patch"),
                   "--config.data.patch=64"]) == 2
  assert "--config.data.patch=64: an imported run takes --config.model.dtype" in capsys.readouterr().err
  assert cli.main(["segment", "--import-nnunet", folder, "--workdir", str(tmp_path / "run_bf16"),
                   "--config.model.dtype=bfloat16", "--config.eval.batch_size=4", "--config.eval.mirror=[]"]) == 0
  saved = json.loads((tmp_path / "run_bf16" / "config.json").read_text())
  assert (saved["model"]["dtype"], saved["eval"]["batch_size"], saved["eval"]["mirror"]) == ("bfloat16", 4, [])
  assert saved["data"]["patch"] == [32, 32] and saved["imported_from"]["configuration"] == "2d"
  with pytest.raises(ConfigError, match="imported from nnU-Net .* give nnU-Net's postprocessing.json"):
    segment.determine_postprocessing(str(tmp_path / "run_bf16"), str(tmp_path / "pp.json"))


def test_several_folds_import_into_fold_folders_that_predict_as_their_ensemble(network, tmp_path, capsys):
  """`--fold 0,1` makes WORKDIR/fold_0 and fold_1 (every fold converted and checked before any is
  written), and `--predict` with WORKDIR averages the two, as with both named."""
  backbone, net = network
  plans = nnunet_plans([0, 1, 2], (1.0, 1.0), (32, 32))
  folder = model_folder(tmp_path, backbone, net, plans)
  checkpoint = torch.load(os.path.join(folder, "fold_0", "checkpoint_final.pth"), weights_only=False)
  generator = torch.Generator().manual_seed(5)
  checkpoint["network_weights"] = {k: v + 0.5 * v.float().std() * torch.randn(v.shape, generator=generator)
                                   if k.startswith("up_projection.") and v.is_floating_point() else v
                                   for k, v in checkpoint["network_weights"].items()}
  os.makedirs(os.path.join(folder, "fold_1"))
  torch.save(checkpoint, os.path.join(folder, "fold_1", "checkpoint_final.pth"))
  ct_volume(str(tmp_path / "in" / "case_0000.nii.gz"), (40, 36, 3), np.diag([1.0, 1.0, 3.0, 1.0]))
  runs = tmp_path / "runs"
  common = ["--config.eval.mirror=[]", "--rope-dtype", "float32"]
  assert cli.main(["segment", "--import-nnunet", folder, "--fold", "0,3", "--workdir", str(runs), *common]) == 2
  assert "fold_3/checkpoint_final.pth not found" in capsys.readouterr().err and not runs.exists()
  lacking = dict(checkpoint, network_weights={k: v for k, v in checkpoint["network_weights"].items()
                                              if k != "up_projection.decode.0.0.weight"})
  os.makedirs(os.path.join(folder, "fold_2"))
  torch.save(lacking, os.path.join(folder, "fold_2", "checkpoint_final.pth"))
  assert cli.main(["segment", "--import-nnunet", folder, "--fold", "0,2", "--workdir", str(runs), *common]) == 2
  assert "up_projection.decode.0.0.weight" in capsys.readouterr().err
  assert not (runs / "fold_0").exists()  # no fold imported: no partial ensemble for --predict to average
  with pytest.raises(SystemExit):
    cli.main(["segment", "--import-nnunet", folder, "--fold", "0,0", "--workdir", str(runs)])
  assert "a comma-separated list of distinct folds" in capsys.readouterr().err
  assert cli.main(["segment", "--import-nnunet", folder, "--fold", "0,1", "--workdir", str(runs), *common]) == 0
  folds = [str(runs / "fold_0"), str(runs / "fold_1")]
  assert capsys.readouterr().out.split() == folds
  assert segment.run_folders([str(runs)]) == folds

  def predict(*workdirs):
    out = tmp_path / f"out{len(os.listdir(tmp_path))}"
    assert cli.main(["segment", *[a for w in workdirs for a in ("--workdir", w)], "--predict", str(tmp_path / "in"),
                     "--out", str(out), "--no-progress"]) == 0
    return nib.load(out / "case.nii.gz").get_fdata()
  ensemble = predict(str(runs))
  np.testing.assert_array_equal(ensemble, predict(*folds))
  assert (ensemble != predict(folds[0])).any() and (ensemble != predict(folds[1])).any()
  with pytest.raises(nnunet.DatasetError, match="imported from an nnU-Net model that reads with SimpleITKIO"):
    segment.predict_folder(folds[0], str(tmp_path / "in"), str(tmp_path / "never"), progress=False,
                           save_probabilities=True, probabilities_reader="NibabelIO")
  os.makedirs(runs / "fold_2")  # a fold not trained (yet) is not silently left out of the ensemble
  with pytest.raises(ConfigError, match="fold folder.s. fold_2 hold no run"):
    segment.run_folders([str(runs)])


@pytest.mark.parametrize("regions", [False, True])
def test_nnunets_postprocessing_json_applies_as_nnunet(tmp_path, regions):
  """nnU-Net's own postprocessing.json (its determine_postprocessing over the cross-validation
  predictions) given to `--postprocessing`: the steps do to a prediction what nnU-Net's
  apply_postprocessing does with the functions and arguments it pickled beside it."""
  from nnunetv2.postprocessing.remove_connected_components import (
      apply_postprocessing, remove_all_but_largest_component_from_segmentation)
  from nnunetv2.utilities.json_export import recursive_fix_for_json_export
  labels = np.zeros((30, 28, 12), np.uint8)
  labels[2:28, 2:26, 1:11] = 1                                    # a body, with two islands each of 2 and 3
  labels[4:10, 4:10, 2:6], labels[15:18, 15:18, 7:9] = 2, 2
  labels[20:24, 5:9, 3:8], labels[5:7, 18:20, 8:10] = 3, 3
  labels[0, 0, 0], labels[29, 27, 11] = 1, 3                      # strays outside it
  if regions:
    kwargs = [{"labels_or_regions": [(1, 2, 3), (2, 3)]}, {"labels_or_regions": (3,)}, {"labels_or_regions": (2, 3)}]
  else:
    kwargs = [{"labels_or_regions": [1, 2, 3]}, {"labels_or_regions": 2}, {"labels_or_regions": 3}]
  fns = [remove_all_but_largest_component_from_segmentation] * len(kwargs)
  written = {"postprocessing_fns": [f.__name__ for f in fns], "postprocessing_kwargs": copy.deepcopy(kwargs),
             "input_folder": {"foreground_mean": {"Dice": 0.5}}}
  recursive_fix_for_json_export(written)
  path = tmp_path / "postprocessing.json"
  path.write_text(json.dumps(written))
  plans = {"labels": {"0": "background", "1": "liver", "2": "kidney", "3": "tumour"}}
  steps = segment.read_postprocessing(str(path), plans)
  expected = apply_postprocessing(labels, fns, kwargs)
  for k in range(len(kwargs)):  # every step changes the labels, so none can be dropped unnoticed
    assert not np.array_equal(apply_postprocessing(labels, fns[:k], kwargs[:k]),
                              apply_postprocessing(labels, fns[:k + 1], kwargs[:k + 1])), k
  np.testing.assert_array_equal(segmentation.apply_postprocessing(labels, steps), expected)

  path.write_text(json.dumps({**written, "postprocessing_fns": ["my_own_fn"] * len(kwargs)}))
  with pytest.raises(ConfigError, match="step 'my_own_fn'"):
    segment.read_postprocessing(str(path), plans)
  path.write_text(json.dumps({**written, "postprocessing_kwargs": [{"labels_or_regions": [1, 7]}] * len(kwargs)}))
  with pytest.raises(ConfigError, match=r"label value\(s\) \[7\]"):
    segment.read_postprocessing(str(path), plans)
