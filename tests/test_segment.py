"""MedDINOv3 segmentation: the network against PyTorch (timm's DINOv3 intermediates and the torch
PatchDecode of benchmarks/torch_reference.py), the nnU-Net loss (ditto), folds, raw-dataset
checks, preprocessing, patch sampling, sliding-window inference, Dice, HD95 and NSD against
MONAI, and `mfjax segment` end to end with resume and prediction."""
import functools
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from sklearn.model_selection import KFold

from benchmarks import torch_reference
from configs import segment as segment_config
from convert import dinov3 as convert_dinov3
from mfjax import cli, models, parallel
from mfjax.config import ConfigError
from mfjax.data import nnunet, synthetic, volumes
from mfjax.evals import segmentation
from mfjax.models import heads
from mfjax.train import segment
from tests.parity import assert_outputs_match
from tests.test_dinov3_parity import SIZES, convert_file, official_state, timm_reference


# ------------------------------------------------------------------ the network against PyTorch


def test_patch_decoder_matches_torch():
  torch.manual_seed(0)
  reference = torch_reference.PatchDecode(256, 5, 4).eval()
  with torch.no_grad():
    for p in reference.parameters():
      p.add_(0.1 * torch.randn_like(p))
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 256)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  state = {"up_projection." + k: v.numpy() for k, v in reference.state_dict().items()}
  ours = heads.PatchDecoder(5, 16).apply({"params": convert_dinov3.convert_decoder(state, 256, 16)}, x)
  assert ours.shape == (2, 48, 80, 5)
  np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max())


def test_decoder_init_is_nnunet_he_with_torch_fan_in():
  variables = heads.PatchDecoder(3, 4).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 512)))["params"]
  gain = np.sqrt(2 / (1 + 0.01 ** 2))
  up = np.asarray(variables["up_0"]["up"]["kernel"])  # torch fan-in of ConvTranspose2d(512, 256, 2): 256 * 4
  assert abs(up.std() / (gain / np.sqrt(256 * 4)) - 1) < 0.02
  cls = np.asarray(variables["classifier"]["kernel"])  # Conv2d(128, 3, 1): fan-in 128
  assert abs(cls.std() / (gain / np.sqrt(128)) - 1) < 0.1
  assert not np.asarray(variables["up_0"]["bias"]).any()


def test_segmenter_features_are_timm_normed_intermediates(tmp_path):
  """Blocks 2, 5, 8, 11 of a converted MedDINOv3 ViT-B through the final norm, as timm's
  forward_intermediates(norm=True) gives them; a 1-channel slice is repeated to 3 channels."""
  backbone = official_state(*SIZES["b"], qkv_bias=False, seed=7)
  module, variables, _ = convert_file(tmp_path, {"teacher": {"backbone." + k: v for k, v in backbone.items()}})
  reference = timm_reference("vit_base_patch16_dinov3", backbone,
                             norm_layer=functools.partial(timm.layers.LayerNorm, eps=1e-6))
  x = np.random.default_rng(1).standard_normal((1, 224, 160, 1)).astype(np.float32)
  with torch.no_grad():
    expected = reference.forward_intermediates(torch.from_numpy(np.repeat(x, 3, -1)).permute(0, 3, 1, 2),
                                               indices=[2, 5, 8, 11], norm=True, intermediates_only=True)
  ours = jax.jit(module.clone(intermediate=(2, 5, 8, 11)).apply)(variables, np.repeat(x, 3, -1))["intermediate"]
  assert_outputs_match({"blocks": [np.asarray(a) for a in ours]},
                       {"blocks": [b.permute(0, 2, 3, 1).reshape(1, -1, 768).numpy() for b in expected]},
                       "normed intermediates 2, 5, 8, 11 vs timm")
  segmenter = heads.Segmenter(module.clone(intermediate=(2, 5, 8, 11)), 4)
  params = jax.eval_shape(segmenter.init, jax.random.PRNGKey(0), x)["params"]
  params = {**jax.tree.map(lambda a: np.full(a.shape, 0.01, a.dtype), params), "foundation": variables["params"]}
  logits = jax.jit(segmenter.apply)({"params": params}, x)
  assert logits.shape == (1, 224, 160, 4) and np.isfinite(np.asarray(logits)).all()


def test_bfloat16_segmenter_stays_close_to_float32():
  """bf16 compute (float32 parameters), the tolerance of tests/test_perf_modes.py: logits within
  3e-2 x max |fp32|, the Dice + CE loss within 1%, gradient cosine >= 0.999."""
  config = segment_config.get_config("tiny=true")
  f32 = segment.build_segmenter(config, 3)
  config.model.dtype = "bfloat16"
  bf16 = segment.build_segmenter(config, 3)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 1)).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, 3, (2, 32, 32)))
  params = jax.jit(f32.init)(jax.random.PRNGKey(0), images)["params"]
  outputs = {}
  for name, model in (("f32", f32), ("bf16", bf16)):  # each one compiled program, not op by op
    loss = lambda p, model=model: segment.dice_ce_loss(model.apply({"params": p}, images), labels, 3)[0]
    outputs[name] = (jax.jit(model.apply)({"params": params}, images), *jax.jit(jax.value_and_grad(loss))(params))
  (logits32, loss32, grad32), (logits16, loss16, grad16) = outputs["f32"], outputs["bf16"]
  assert logits16.dtype == jnp.float32
  difference = np.abs(np.asarray(logits16) - np.asarray(logits32)).max() / np.abs(np.asarray(logits32)).max()
  assert 1e-4 < difference <= 3e-2  # off float32 by bf16's rounding: bf16 is really used
  assert abs(float(loss16) - float(loss32)) <= 0.01 * abs(float(loss32))
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
  g16, g32 = flat(grad16), flat(grad32)
  assert g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)) >= 0.999


def test_intermediate_blocks_must_exist():
  module = models.create("meddinov3_vitb16", width=32, depth=2, heads=2, mlp_hidden=64, intermediate=(1, 2))
  with pytest.raises(ValueError, match=r"intermediate blocks \[2\] do not exist"):
    module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------ loss, folds, metrics


IGNORE_CASES = [(None, None), (4, "sparse"), (4, "everything")]  # (ignore label, which pixels carry it)


def _with_ignore(labels, rng, ignore_label, which):
  if which == "sparse":
    labels = np.where(rng.random(labels.shape) < 0.6, ignore_label, labels)
  elif which == "everything":
    labels = np.full_like(labels, ignore_label)
  return labels


@pytest.mark.parametrize("ignore_label,which", IGNORE_CASES)
def test_dice_ce_loss_and_gradient_match_nnunet(ignore_label, which):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 8, 9, 4)).astype(np.float32) * 2
  labels = rng.integers(0, 4, (3, 8, 9))
  labels[:, :, :3] = 0
  labels = _with_ignore(labels, rng, ignore_label, which)
  t_logits = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).requires_grad_()
  expected = torch_reference.dice_ce_loss(t_logits, torch.from_numpy(labels), ignore_label=ignore_label)
  expected.backward()
  loss_fn = lambda z: segment.dice_ce_loss(z, jnp.asarray(labels), 4, ignore_label=ignore_label)[0]
  np.testing.assert_allclose(loss_fn(logits), expected.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(loss_fn)(logits)), t_logits.grad.numpy().transpose(0, 2, 3, 1),
                             atol=1e-6)


@pytest.mark.parametrize("ignore_label,which", IGNORE_CASES)
def test_dice_bce_region_loss_and_gradient_match_nnunet(ignore_label, which):
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((3, 8, 9, 3)).astype(np.float32) * 2
  labels = _with_ignore(rng.integers(0, 4, (3, 8, 9)), rng, ignore_label, which)
  regions = ((1, 2, 3), (2, 3), (3,))   # BraTS' whole tumour, tumour core, enhancing tumour
  t_logits = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).requires_grad_()
  expected = torch_reference.dice_bce_loss(t_logits, torch.from_numpy(labels), regions, ignore_label=ignore_label)
  expected.backward()
  loss_fn = lambda z: segment.dice_bce_loss(z, jnp.asarray(labels), regions, ignore_label=ignore_label)[0]
  np.testing.assert_allclose(loss_fn(logits), expected.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(loss_fn)(logits)), t_logits.grad.numpy().transpose(0, 2, 3, 1),
                             atol=1e-6)


def test_region_predictions_follow_regions_class_order_and_score_per_region():
  # two nested regions (organs = {1, 2}, kidney = {2}): kidney written over organs
  logits = np.full((1, 2, 2, 3), -5.0, np.float32)
  logits[0, 0, :, :2] = 5.0       # organs at columns 0-1
  logits[0, 1, :, 1:] = 5.0       # kidney at columns 1-2 (column 2: kidney alone)
  labels = segmentation.labels_at_shape(logits, (2, 3), regions_class_order=(1, 2))
  np.testing.assert_array_equal(labels[..., 0], [[1, 2, 2], [1, 2, 2]])
  truth = np.array([[1, 2, 0], [1, 1, 0]])[..., None]
  dice = segmentation.dice_per_class(labels, truth, {1: (1, 2), 2: (2,)})
  assert dice == {1: pytest.approx(2 * 4 / (6 + 4)), 2: pytest.approx(2 * 1 / (4 + 1))}


@pytest.mark.parametrize("n", [5, 12, 33])
def test_folds_are_nnunets_kfold(n):
  ids = [f"case_{i:03d}" for i in range(n)][::-1]
  ours = nnunet.kfold_splits(ids)
  keys = np.sort(ids)
  for fold, (train, val) in enumerate(KFold(5, shuffle=True, random_state=12345).split(keys)):
    assert ours[fold] == {"train": keys[train].tolist(), "val": keys[val].tolist()}


def test_window_starts_and_stitching_equal_whole_slice_prediction():
  assert segmentation.window_starts(100, 64) == [0, 18, 36]
  assert segmentation.window_starts(64, 64) == [0] and segmentation.window_starts(40, 64) == [0]
  rng = np.random.default_rng(0)
  slices = rng.standard_normal((3, 41, 77)).astype(np.float32)
  w = rng.standard_normal(4).astype(np.float32)
  pixelwise = lambda images: images * w  # (B, H, W, 1) -> (B, H, W, 4), any tiling gives the same
  for mirror in (False, True):
    logits = segmentation.predict_slices(pixelwise, slices, (32, 32), 4, batch_size=5, mirror=mirror)
    np.testing.assert_allclose(logits, slices[:, None] * w[None, :, None, None], atol=1e-5)
  weights = segmentation.gaussian_weights((32, 32))
  assert weights.max() == 1 and weights.min() > 0 and weights[16, 16] == 1


@pytest.mark.parametrize("mirror", [False, True])
def test_device_weighted_tiles_equal_the_host_stitching(mirror):
  """make_predictor's path (flips and Gaussian inside one jitted call) gives predict_slices'
  host-side result, for a tile function that flips change (a horizontal difference)."""
  rng = np.random.default_rng(2)
  slices = rng.standard_normal((3, 45, 70)).astype(np.float32)
  w = jnp.asarray(rng.standard_normal(3).astype(np.float32))
  tile_fn = lambda x: (x - jnp.roll(x, 1, axis=2)) * w + x * x  # (B, H, W, 1) -> (B, H, W, 3)
  host = segmentation.predict_slices(lambda images: np.asarray(tile_fn(jnp.asarray(images))), slices, (32, 32), 3,
                                     batch_size=4, mirror=mirror)
  weights = jnp.asarray(segmentation.gaussian_weights((32, 32)))
  fused = jax.jit(lambda images: segmentation.weighted_tile_logits(tile_fn, images, weights, mirror))
  device = segmentation.predict_slices(lambda images: np.asarray(fused(images)), slices, (32, 32), 3, batch_size=4,
                                       weighted=True)
  np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-5)


def test_prediction_batch_need_not_divide_the_devices():
  """A run trained with eval.batch_size 8 predicts on 3 devices: the tiles are padded up to 9."""
  script = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3"
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from mfjax import parallel
from mfjax.evals import segmentation
from mfjax.train import segment
model = nn.Conv(2, (3, 3))
images = np.random.default_rng(0).standard_normal((8, 16, 16, 1)).astype(np.float32)
params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
mesh = parallel.make_mesh()
assert mesh.devices.size == 3
got = segment.make_predictor(model, mesh, 8, (16, 16), True)(params, images)
weights = jnp.asarray(segmentation.gaussian_weights((16, 16)))
want = segmentation.weighted_tile_logits(lambda x: model.apply({"params": params}, x), images, weights, True)
np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
print("ok", got.shape)
"""
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "ok (8, 16, 16, 2)" in done.stdout


def test_dice_skips_classes_absent_from_the_truth():
  truth = np.zeros((4, 4, 2), np.uint8)
  truth[:2, :2] = 1
  prediction = truth.copy()
  prediction[0, 0, 0] = 0
  prediction[3, 3, 1] = 2
  dice = segmentation.dice_per_class(prediction, truth, [1, 2])
  assert dice[1] == pytest.approx(2 * 7 / (7 + 8)) and np.isnan(dice[2])
  summary = segmentation.summarize({"a": {"dice": dice, "hd95": {1: 2.0, 2: np.nan}},
                                    "b": {"dice": {1: 1.0, 2: 0.5}, "hd95": {1: 4.0, 2: 7.0}},
                                    "c": {"dice": {1: 0.0, 2: np.nan}, "hd95": {1: np.nan, 2: np.nan}}},
                                   {1: "liver", 2: "kidney"})
  assert summary["dice"] == {"liver": pytest.approx((14 / 15 + 1) / 3), "kidney": 0.5}
  assert summary["mean_dice"] == pytest.approx(((14 / 15 + 1) / 3 + 0.5) / 2)
  assert summary["hd95"] == {"liver": 3.0, "kidney": 7.0} and summary["mean_hd95"] == 5.0
  assert summary["hd95_missed"] == {"liver": 1, "kidney": 0}


def _blobs(rng, shape):
  from scipy import ndimage
  return ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.05


@pytest.mark.parametrize("regions_class_order", [(), (1, 3)])
def test_labels_in_chunks_equal_the_whole_volume_at_once(regions_class_order):
  rng = np.random.default_rng(3)
  weights = rng.standard_normal(3).astype(np.float32)
  slices = rng.standard_normal((7, 40, 36)).astype(np.float32)
  logits_of = lambda s: segmentation.predict_slices(lambda images: np.tanh(images * weights), s, (32, 32), 3, 4,
                                                    mirror=True)[:, :len(regions_class_order) or 3]
  whole = segmentation.labels_at_shape(logits_of(slices), (45, 50), regions_class_order)
  for chunk in (1, 3, 7, 10):
    np.testing.assert_array_equal(segmentation.labels_in_chunks(logits_of, slices, (45, 50), regions_class_order,
                                                                chunk), whole)
  assert len(np.unique(whole)) > 1


@pytest.mark.parametrize("case", ["overlap", "empty_prediction", "both_at_the_border"])
def test_hd95_and_nsd_match_monai(case):
  from monai.metrics import compute_hausdorff_distance, compute_surface_dice
  rng = np.random.default_rng({"overlap": 0, "empty_prediction": 1, "both_at_the_border": 2}[case])
  shape, spacing = (40, 36, 12), (0.8, 0.7, 2.5)
  truth = _blobs(rng, shape).astype(np.uint8)  # about a third of the volume, in several pieces
  prediction = ((truth == 1) & (rng.random(shape) < 0.9) | _blobs(rng, shape)).astype(np.uint8)
  if case == "empty_prediction":
    prediction[:] = 0
  if case == "both_at_the_border":
    truth[:, :, 0] = prediction[:, :, 0] = 1
  ours = segmentation.surface_metrics(prediction, truth, [1], spacing, tolerance=1.0)
  onehot = lambda x: torch.from_numpy(np.stack([x == 0, x == 1])[None].astype(np.float32))
  with np.errstate(all="ignore"), pytest.warns() if case == "empty_prediction" else _no_warning():
    hd95 = compute_hausdorff_distance(onehot(prediction), onehot(truth), percentile=95, spacing=spacing).item()
    nsd = compute_surface_dice(onehot(prediction), onehot(truth), [1.0], spacing=spacing).item()
  assert ours["hd95"][1] == pytest.approx(hd95, rel=1e-5, nan_ok=True)
  assert ours["nsd"][1] == pytest.approx(nsd, rel=1e-6)
  if case == "overlap":  # a case where neither metric is trivial
    assert 2 < ours["hd95"][1] < 10 and 0.5 < ours["nsd"][1] < 0.95
  assert (case == "empty_prediction") == np.isnan(ours["hd95"][1]) == np.isnan(hd95)
  assert np.isnan(segmentation.surface_metrics(prediction, 0 * truth, [1], spacing)["hd95"][1])


def _no_warning():
  import contextlib
  return contextlib.nullcontext()


# ------------------------------------------------------------------ raw datasets and preprocessing


@pytest.fixture(scope="module")
def raw_ct(module_tmp):
  return synthetic.nnunet_ct(str(module_tmp.mktemp("raw")), num_cases=6, test_cases=2)


def test_splits_final_json_is_read_where_nnunet_keeps_it(raw_ct, tmp_path, monkeypatch, caplog):
  import dataclasses
  import logging
  raw = nnunet.read_raw(raw_ct)
  ids = list(raw.cases)
  monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
  with caplog.at_level(logging.INFO, logger="mfjax"):
    assert nnunet.fold_cases(raw, 1) == tuple(nnunet.kfold_splits(ids)[1].values())
  assert "nnU-Net's 5-fold split" in caplog.text
  # A custom split (e.g. the one a nnU-Net baseline used) in $nnUNet_preprocessed/<dataset folder>/.
  custom = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:4], "val": ids[4:]}]
  folder = tmp_path / "preprocessed" / os.path.basename(raw.root)
  folder.mkdir(parents=True)
  (folder / "splits_final.json").write_text(json.dumps(custom))
  assert nnunet.fold_cases(raw, 1) == (ids[:4], ids[4:])
  # The raw folder's own file comes first; a disagreement between the two is pointed out.
  own = tmp_path / "raw_copy"
  own.mkdir()
  (own / "splits_final.json").write_text(json.dumps(custom[::-1]))
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="mfjax"):
    moved = dataclasses.replace(raw, root=str(own))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "elsewhere"))
    os.makedirs(tmp_path / "elsewhere" / "raw_copy")
    (tmp_path / "elsewhere" / "raw_copy" / "splits_final.json").write_text(json.dumps(custom))
    assert nnunet.fold_cases(moved, 1) == (ids[2:], ids[:2])
  assert "differ; using the first" in caplog.text and f"folds from {own}" in caplog.text
  (own / "splits_final.json").write_text("{not json")
  with pytest.raises(nnunet.DatasetError, match="not a readable splits file"):
    nnunet.fold_cases(moved, 0)
  for wrong in ({"train": ids}, [{"train": ids, "validation": []}]):
    (own / "splits_final.json").write_text(json.dumps(wrong))
    with pytest.raises(nnunet.DatasetError, match="must be a list of folds, each"):
      nnunet.fold_cases(moved, 0)


def test_volumes_are_read_in_canonical_orientation(tmp_path):
  data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  volumes.write_volume(str(tmp_path / "ras.nii.gz"), data, (0.5, 0.6, 2.0))
  lps = np.diag([-0.5, -0.6, 2.0, 1.0])
  volumes.write_volume(str(tmp_path / "lps.nii.gz"), data[::-1, ::-1], affine=lps)
  for name in ("ras", "lps"):
    array, spacing = volumes.read_volume(str(tmp_path / f"{name}.nii.gz"))
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(spacing, (0.5, 0.6, 2.0), rtol=1e-6)
    np.testing.assert_allclose(volumes.read_spacing(str(tmp_path / f"{name}.nii.gz")), spacing)
  (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
  with pytest.raises(volumes.VolumeError, match="bad.nii.gz: not a readable NIfTI"):
    volumes.read_volume(str(tmp_path / "bad.nii.gz"))
  labels = np.zeros((4, 5, 6), np.float32)
  labels[1, 2, 3] = 1.5
  volumes.write_volume(str(tmp_path / "half.nii.gz"), labels)
  with pytest.raises(volumes.VolumeError, match=r"half.nii.gz: a label map must hold whole numbers in 0..255; "
                                                r"1 voxel\(s\) do not \(1.5, first at voxel \(1, 2, 3\)\)"):
    volumes.read_labels(str(tmp_path / "half.nii.gz"))


def _copy_raw(raw_ct, tmp_path):
  import shutil
  return shutil.copytree(raw_ct, tmp_path / "Dataset990_SynthCT")


def test_raw_dataset_problems_name_the_file_or_key(raw_ct, tmp_path):
  raw = nnunet.read_raw(raw_ct)
  assert (raw.modality, raw.num_classes, len(raw.cases)) == ("CT", 3, 6)
  assert raw.labels == {0: "background", 1: "liver", 2: "kidney"}
  root = _copy_raw(raw_ct, tmp_path)
  meta = json.loads((root / "dataset.json").read_text())

  def expect(change, match):
    (root / "dataset.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(nnunet.DatasetError, match=match):
      nnunet.read_raw(str(root))

  expect({"channel_names": {"0": "T1", "1": "T2"}}, "imagesTr/synth_000_0001.nii.gz")   # a channel's files missing
  expect({"channel_names": {"0": "T1", "2": "T2"}}, r'must be "0", "1", ... in order')
  import shutil
  shutil.copy(root / "imagesTr" / "synth_000_0000.nii.gz", root / "imagesTr" / "synth_000.nii.gz")  # a 4-D MSD file
  expect({"channel_names": {"0": "T1", "1": "T2"}, "training": [{"image": "./imagesTr/synth_000.nii.gz",
                                                                 "label": "./labelsTr/synth_000.nii.gz"}]},
         r"an MSD \(v1\) dataset with 2 channels stores them in one 4-D image")
  os.remove(root / "imagesTr" / "synth_000.nii.gz")
  expect({"dataset": {"a": {"images": ["imagesTr/synth_000_0000.nii.gz", "imagesTr/synth_000_0000.nii.gz"],
                            "label": "labelsTr/synth_000.nii.gz"}}}, r"dataset\['a'\] lists 2 image\(s\) for 1")
  expect({"labels": {"background": 0, "kidney": [1, 2]}}, "need 'regions_class_order'")
  expect({"labels": {"background": 0, "kidney": [1, 2]}, "regions_class_order": [1, 2]}, "one positive label value")
  expect({"labels": {"background": 0, "kidney": [1, "x"]}, "regions_class_order": [1]}, "not a list of positive")
  expect({"labels": {"background": 0, "liver": 1, "kidney": 3}}, "not consecutive")
  expect({"labels": {"background": 0, "liver": 1, "kidney": 2, "ignore": 4}}, "right after the highest label value 2")
  expect({"labels": {"background": 0, "liver": 1, "kidney": 2, "ignore": [3]}}, "must be one integer")
  expect({"labels": {"background": 0, "organs": [1, 2], "kidney": 2, "ignore": 2}, "regions_class_order": [1, 2]},
         "must be above every other label value")
  expect({"labels": {"liver": 1}}, "background as 0")
  expect({"numTraining": 9}, "numTraining is 9 but 6")
  expect({"numTraining": "six"}, "numTraining must be a whole number, not 'six'")
  expect({"training": [{"image": "./imagesTr/synth_000.nii.gz"}]}, r"training\[0\] must be")
  expect({"training": {"image": "x"}}, "'training' must be a list")
  expect({"dataset": ["imagesTr/synth_000_0000.nii.gz"]}, "'dataset' must map each case")
  (root / "dataset.json").write_text(json.dumps([meta]))
  with pytest.raises(nnunet.DatasetError, match="must hold a JSON object"):
    nnunet.read_raw(str(root))
  # Eleven channels: "10" sorts before "2" as text, and is still in order.
  eleven = {str(k): f"T{k}" for k in range(11)}
  expect({"channel_names": eleven}, "imagesTr/synth_000_0001.nii.gz")
  expect({"file_ending": ".mha"}, "file_ending '.mha' is not supported")
  (root / "dataset.json").write_text(json.dumps(meta))
  os.remove(root / "labelsTr" / "synth_003.nii.gz")
  with pytest.raises(nnunet.DatasetError, match="labelsTr/synth_003.nii.gz"):
    nnunet.read_raw(str(root))


def test_other_dataset_json_layouts_nnunet_accepts(raw_ct, tmp_path):
  raw = nnunet.read_raw(raw_ct)
  root = _copy_raw(raw_ct, tmp_path)
  meta = json.loads((root / "dataset.json").read_text())
  v2 = nnunet.read_raw(str(root))

  def read(change):
    (root / "dataset.json").write_text(json.dumps({**meta, **change}))
    return nnunet.read_raw(str(root))

  # Labels as one-element lists, or as strings: nnU-Net's LabelManager takes both as plain labels.
  for labels in ({"background": 0, "liver": [1], "kidney": [2]}, {"background": "0", "liver": "1", "kidney": "2"},
                 {"0": "background", "1": "liver", "2": "kidney"}):
    got = read({"labels": labels})
    assert (got.labels, got.regions) == (raw.labels, {}), labels
  # An nnU-Net v1 Task: "training" names CASE.nii.gz, the files on disk are CASE_0000.nii.gz.
  training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in raw.cases]
  got = read({"training": training})
  assert got.channel_files == v2.channel_files and got.cases == v2.cases
  # nnU-Net v2's explicit "dataset" lists, relative to the dataset folder or absolute; only these cases.
  listed = {"first": {"images": ["imagesTr/synth_001_0000.nii.gz"], "label": "labelsTr/synth_001.nii.gz"},
            "second": {"images": [str(root / "imagesTr" / "synth_002_0000.nii.gz")],
                       "label": str(root / "labelsTr" / "synth_002.nii.gz")}}
  got = read({"dataset": listed, "numTraining": 2})
  assert got.cases == {"first": v2.cases["synth_001"], "second": v2.cases["synth_002"]}


def test_preprocessing_errors_name_the_case(raw_ct, tmp_path):
  root = _copy_raw(raw_ct, tmp_path)
  (root / "imagesTr" / "synth_001_0000.nii.gz").write_bytes(b"\x1f\x8b broken")
  with pytest.raises(volumes.VolumeError, match="synth_001_0000.nii.gz"):
    nnunet.preprocess(nnunet.read_raw(str(root)), str(tmp_path / "pre"), progress=False)
  root = _copy_raw(raw_ct, tmp_path / "again")
  labels, _ = volumes.read_labels(str(root / "labelsTr" / "synth_004.nii.gz"))
  labels[0, 0, 0] = 7
  volumes.write_volume(str(root / "labelsTr" / "synth_004.nii.gz"), labels,
                       affine=volumes.canonical_affine(str(root / "labelsTr" / "synth_004.nii.gz")))
  with pytest.raises(nnunet.DatasetError, match=r"synth_004.nii.gz: label values \[7\]"):
    nnunet.preprocess(nnunet.read_raw(str(root)), str(tmp_path / "pre2"), progress=False)


def test_a_misspelt_dataset_json_key_is_warned_about(raw_ct, tmp_path, caplog):
  root = _copy_raw(raw_ct, tmp_path)
  meta = json.loads((root / "dataset.json").read_text())
  meta["region_class_order"] = [1, 2]   # regions_class_order, misspelt: it would be ignored
  (root / "dataset.json").write_text(json.dumps(meta))
  with caplog.at_level("WARNING", logger="mfjax"):
    nnunet.read_raw(str(root))
  assert "key(s) ['region_class_order'] are not nnU-Net's (a typo?)" in caplog.text


def test_preprocessing_resumes_after_a_bad_case_without_redoing_the_finished_ones(raw_ct, tmp_path, monkeypatch):
  root = _copy_raw(raw_ct, tmp_path)
  bad = str(root / "labelsTr" / "synth_004.nii.gz")
  good_labels, _ = volumes.read_labels(bad)
  affine = volumes.canonical_affine(bad)
  broken = good_labels.copy()
  broken[0, 0, 0] = 7
  volumes.write_volume(bad, broken, affine=affine)
  with pytest.raises(nnunet.DatasetError, match=r"synth_004.nii.gz: label values \[7\]"):
    nnunet.preprocess(nnunet.read_raw(str(root)), str(tmp_path / "pre"), progress=False)
  volumes.write_volume(bad, good_labels, affine=affine)   # the user fixes the file and runs again
  read = []
  real_read_volume = volumes.read_volume
  monkeypatch.setattr(volumes, "read_volume",
                      lambda path, *args: read.append(os.path.basename(path)) or real_read_volume(path, *args))
  # The fingerprint stopped at synth_004: it reads only the last two cases; the arrays, every case.
  real_prepare_case = nnunet.prepare_case
  def prepare_case(image, labels, spacing, plans):
    if read[-1] == "synth_003.nii.gz" and not stopped:   # then stopped again, writing synth_003's arrays
      stopped.append(True)
      raise KeyboardInterrupt
    return real_prepare_case(image, labels, spacing, plans)
  stopped = []
  monkeypatch.setattr(nnunet, "prepare_case", prepare_case)
  with pytest.raises(KeyboardInterrupt):
    nnunet.preprocess(nnunet.read_raw(str(root)), str(tmp_path / "pre"), progress=False)
  cases = [f"synth_{i:03d}" for i in range(6)]
  files = lambda names: [f for c in names for f in (f"{c}.nii.gz", f"{c}_0000.nii.gz")]
  assert sorted(read) == sorted(files(["synth_004", "synth_005"]) + files(cases[:4]))
  read.clear()
  resumed = nnunet.preprocess(nnunet.read_raw(str(root)), str(tmp_path / "pre"), progress=False)
  assert sorted(read) == sorted(files(cases[3:]))   # the fingerprint is whole; three cases' arrays are left
  fresh = nnunet.preprocess(nnunet.read_raw(str(root)), str(tmp_path / "fresh"), progress=False)
  assert resumed == fresh
  for case in resumed["cases"]:
    for suffix in (".npy", "_seg.npy", "_locations.npy"):
      np.testing.assert_array_equal(np.load(tmp_path / "pre" / (case + suffix)),
                                    np.load(tmp_path / "fresh" / (case + suffix)))


def test_label_maps_off_their_images_grid_are_all_named_before_preprocessing(raw_ct, tmp_path, caplog):
  root = _copy_raw(raw_ct, tmp_path)
  label_file = lambda case: str(root / "labelsTr" / f"{case}.nii.gz")
  # synth_002 is stored LPS; its label rewritten in RAS order on the same grid is still aligned.
  labels, _ = volumes.read_labels(label_file("synth_002"))
  volumes.write_volume(label_file("synth_002"), labels, affine=volumes.canonical_affine(label_file("synth_002")))
  assert nnunet.verify_geometry(nnunet.read_raw(str(root))) == []
  # Another origin alone (LiTS-like headers): taken voxel for voxel with a warning, as nnU-Net does.
  shifted = volumes.canonical_affine(label_file("synth_001"))
  shifted[:3, 3] += (0.0, 2.5, 0.0)
  volumes.write_volume(label_file("synth_001"), volumes.read_labels(label_file("synth_001"))[0], affine=shifted)
  with caplog.at_level("WARNING", logger="mfjax"):
    assert nnunet.verify_geometry(nnunet.read_raw(str(root))) == []
  assert "synth_001.nii.gz: origin 2.5 mm from its image's" in caplog.text
  # The same raw array and origin under a flipped direction is no origin shift: pairing would mirror it.
  flipped = volumes.file_affine(label_file("synth_004"))
  flipped[:3, 0] *= -1
  raw_labels = volumes.read_volume(label_file("synth_004"), canonical=False)[0]
  volumes.write_volume(label_file("synth_004"), raw_labels.astype(np.uint8), affine=flipped)
  (problem,) = nnunet.verify_geometry(nnunet.read_raw(str(root)))
  assert "synth_004.nii.gz: stored in another axis order or direction than its image" in problem
  flipped[:3, 0] *= -1
  volumes.write_volume(label_file("synth_004"), raw_labels.astype(np.uint8), affine=flipped)
  # Another spacing, or another shape: errors, every case at once.
  scaled = volumes.canonical_affine(label_file("synth_002"))
  scaled[:3, :3] *= 1.5
  volumes.write_volume(label_file("synth_002"), volumes.read_labels(label_file("synth_002"))[0], affine=scaled)
  volumes.write_volume(label_file("synth_003"), volumes.read_labels(label_file("synth_003"))[0][:-1],
                       affine=volumes.canonical_affine(label_file("synth_003")))
  with pytest.raises(nnunet.DatasetError, match="2 case") as error:
    nnunet.preprocess(nnunet.read_raw(str(root)), str(tmp_path / "pre"), progress=False)
  assert "synth_002.nii.gz: its voxel spacing or orientation differs from its image's by up to" in str(error.value)
  assert "synth_003.nii.gz: shape (47, 48, 10) differs from its image's (48, 48, 10)" in str(error.value)
  assert os.listdir(tmp_path / "pre") == []


def test_preprocess_plans_resampling_and_reuse(raw_ct, tmp_path):
  raw = nnunet.read_raw(raw_ct)
  plans = nnunet.preprocess(raw, str(tmp_path / "pre"), progress=False)
  spacings = np.stack([volumes.read_spacing(image) for image, _ in raw.cases.values()])
  np.testing.assert_allclose(plans["target_spacing_xy"], np.median(spacings[:, :2], axis=0))
  foreground = []
  for index, (case, (image_path, label_path)) in enumerate(raw.cases.items()):
    image, spacing = volumes.read_volume(image_path)
    labels, _ = volumes.read_labels(label_path)
    sample = nnunet.foreground_sample(image[labels > 0][:, None], index)  # 10000 a case, with replacement
    assert len(sample) == nnunet.FG_SAMPLES_PER_CASE and np.isin(sample, image[labels > 0]).all()
    foreground.append(sample)
    stored = np.load(tmp_path / "pre" / f"{case}_seg.npy")
    expected_xy = nnunet.target_shape(image.shape[:2], spacing[:2], plans["target_spacing_xy"])
    assert stored.shape == (image.shape[2], *expected_xy) == tuple(plans["cases"][case]["shape"])
    locations = np.load(tmp_path / "pre" / f"{case}_locations.npy")
    assert (stored[locations[:, 1], locations[:, 2], locations[:, 3]] == locations[:, 0]).all()
  foreground = np.concatenate(foreground)
  assert plans["intensity"][0]["mean"] == pytest.approx(foreground.mean(), rel=1e-5)
  assert plans["intensity"][0]["percentile_99_5"] == pytest.approx(np.percentile(foreground, 99.5), rel=1e-5)
  again = nnunet.preprocess(raw, str(tmp_path / "pre"), progress=False)
  assert again == plans
  # dataset.json edited since (a corrected modality picks another normalisation): not the old arrays.
  meta_path = os.path.join(raw_ct, "dataset.json")
  original = open(meta_path).read()
  try:
    with open(meta_path, "w") as f:
      json.dump({**json.loads(original), "channel_names": {"0": "MRI"}}, f)
    with pytest.raises(nnunet.DatasetError, match=r"dataset.json changed \(channel_names \['CT'\] -> \['MRI'\]\)"):
      nnunet.preprocess(nnunet.read_raw(raw_ct), str(tmp_path / "pre"), progress=False)
  finally:
    with open(meta_path, "w") as f:
      f.write(original)
  with pytest.raises(nnunet.DatasetError, match="another dataset"):
    nnunet.preprocess(raw, str(tmp_path / "pre"), spacing_xy=(0.5, 0.5), progress=False)
  older = dict(plans, fingerprint={k: v for k, v in plans["fingerprint"].items() if k != "preprocessing"})
  (tmp_path / "pre" / "plans.json").write_text(json.dumps(older))   # written before cropping existed
  with pytest.raises(nnunet.DatasetError, match="older mfjax's preprocessing"):
    nnunet.preprocess(raw, str(tmp_path / "pre"), progress=False)


def test_sampler_is_deterministic_and_oversamples_foreground(raw_ct, tmp_path):
  raw = nnunet.read_raw(raw_ct)
  plans = nnunet.preprocess(raw, str(tmp_path / "pre"), progress=False)
  sampler = nnunet.SliceSampler(str(tmp_path / "pre"), plans, list(raw.cases), (24, 24), 6, 0.5, seed=3)
  first, again = sampler.batch(5), sampler.batch(5)
  np.testing.assert_array_equal(first["image"], again["image"])
  threaded = nnunet.SliceSampler(str(tmp_path / "pre"), plans, list(raw.cases), (24, 24), 6, 0.5, seed=3, workers=3)
  jax.tree.map(np.testing.assert_array_equal, threaded.batch(5), first)
  assert first["image"].shape == (6, 24, 24, 1) and first["label"].shape == (6, 24, 24)
  np.testing.assert_array_equal(sampler.batch(5, range(3, 6))["label"], first["label"][3:])
  for step in range(10):  # the last half of each batch is centred on a foreground voxel
    labels = sampler.batch(step, range(3, 6))["label"]
    assert all((l > 0).any() for l in labels)
  # No file handle stays open per case drawn (cached memory maps ran out of handles on large datasets).
  open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
  assert not [f for f in open_files if f.startswith(str(tmp_path / "pre"))]
  plain = nnunet.SliceSampler(str(tmp_path / "pre"), plans, ["synth_000"], (24, 24), 2, 0.0, augment=False, seed=0)
  image, labels = plain.sample(0, 0)
  rng = np.random.default_rng([0, 0, 0])
  rng.integers(1)
  z = rng.integers(plans["cases"]["synth_000"]["shape"][0])
  full = np.maximum(np.load(tmp_path / "pre" / "synth_000_seg.npy")[z], 0)  # outside the nonzero region: background
  corner = [int(rng.integers(0, s - 24 + 1)) for s in full.shape]
  np.testing.assert_array_equal(labels, full[corner[0]:corner[0] + 24, corner[1]:corner[1] + 24])
  # A patch on a foreground voxel is cut as nnU-Net cuts it, from corner voxel - patch // 2: on the voxel
  # grid, image and labels alike (it fell half a voxel off it, blending the image's pixels).
  on_foreground = nnunet.SliceSampler(str(tmp_path / "pre"), plans, ["synth_000"], (24, 24), 1, 1.0, augment=False)
  image, labels = on_foreground.sample(0, 0)
  rng = np.random.default_rng([0, 0, 0])
  rng.integers(1)
  _, _, locations, foreground, _ = on_foreground.arrays("synth_000")
  rows = locations[locations[:, 0] == foreground[rng.integers(len(foreground))]]
  _, z, cx, cy = rows[rng.integers(len(rows))]
  pad = lambda a: np.pad(a, ((24, 24), (24, 24)) + ((0, 0),) * (a.ndim - 2))
  window = (slice(cx - 12 + 24, cx + 12 + 24), slice(cy - 12 + 24, cy + 12 + 24))
  np.testing.assert_array_equal(image, pad(np.load(tmp_path / "pre" / "synth_000.npy")[z])[window])
  np.testing.assert_array_equal(labels, pad(np.maximum(np.load(tmp_path / "pre" / "synth_000_seg.npy")[z], 0))[window])


def test_label_resampling_is_nnunets_resize_segmentation():
  """Random label maps (ties between values included), up and down, odd and tiny sizes: the
  four-neighbour computation equals resize_segmentation as nnU-Net calls it (batchgenerators) value by value."""
  rng = np.random.default_rng(0)
  for trial in range(200):
    nx, ny, nz = rng.integers(1, 30, 3)
    labels = rng.integers(-1, 4, (nx, ny, nz)).astype(np.int16)
    if trial % 2:   # smooth regions instead of noise
      labels = np.repeat(np.repeat(labels[::4, ::4], 4, 0), 4, 1)[:nx, :ny]
    if trial % 5 == 4:
      labels = (labels + 1).astype(np.uint8)
    shape = [(2 * labels.shape[0], labels.shape[1] // 2 + 1),   # halving: exact ties at every boundary
             (max(labels.shape[0] // 2, 1), 2 * labels.shape[1]),
             tuple(int(s) for s in rng.integers(1, 45, 2))][trial % 3]
    expected = np.stack([torch_reference.resize_segmentation(labels[:, :, k], shape)
                         for k in range(labels.shape[2])], axis=-1)
    np.testing.assert_array_equal(nnunet.resample_labels_inplane(labels, shape), expected,
                                  err_msg=f"{labels.shape} -> {shape}")


@pytest.mark.parametrize("modality,slice_mm", [("CT", 3.0), ("CT", 1.5), ("MRI", 3.0)])
def test_preprocessing_is_nnunets_normalise_then_resample(tmp_path, modality, slice_mm):
  """The stored arrays are nnU-Net's, written from its code: crop, CTNormalization or
  ZScoreNormalization (use_mask_for_norm on the masked MR), then skimage's resize (cubic, edge,
  clipped to the input's range) of each slice of an anisotropic volume (3 mm slices) or of the
  whole volume (1.5 mm), and resize_segmentation (order 1 per label) slice by slice."""
  from skimage.transform import resize
  raw = nnunet.read_raw(synthetic.nnunet_ct(str(tmp_path / "raw"), num_cases=4, test_cases=0, modality=modality,
                                            slice_mm=slice_mm))
  plans = nnunet.preprocess(raw, str(tmp_path / "pre"), progress=False)
  assert plans["use_mask_for_norm"] == [modality == "MRI"]
  dataset, resampled = plans["intensity"][0], 0
  for case, (image_path, label_path) in raw.cases.items():
    image, spacing = volumes.read_volume(image_path)
    image, seg, _ = nnunet.crop_to_nonzero(image, volumes.read_labels(label_path)[0])
    if modality == "CT":
      image = (np.clip(image, dataset["percentile_00_5"], dataset["percentile_99_5"]) - dataset["mean"]) / max(
          dataset["std"], 1e-8)
    else:
      mask = seg >= 0
      image[mask] = (image[mask] - image[mask].mean()) / max(image[mask].std(), 1e-8)
    shape = nnunet.target_shape(image.shape[:2], spacing[:2], plans["target_spacing_xy"])
    resampled += shape != image.shape[:2]
    assert nnunet.resamples_slice_by_slice(spacing, plans["target_spacing_xy"]) == (slice_mm == 3.0)
    if slice_mm == 3.0:
      expected = np.stack([resize(image[:, :, k].astype(float), shape, 3, mode="edge", anti_aliasing=False)
                           for k in range(image.shape[2])])
    else:
      expected = resize(image.astype(float), (*shape, image.shape[2]), 3, mode="edge", anti_aliasing=False)
      expected = expected.transpose(2, 0, 1)
    np.testing.assert_allclose(np.load(tmp_path / "pre" / f"{case}.npy")[..., 0], expected, atol=2e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "pre" / f"{case}_seg.npy"), np.stack(
        [torch_reference.resize_segmentation(seg[:, :, k], shape) for k in range(seg.shape[2])]))
  assert resampled >= 2


def test_crop_to_nonzero_is_nnunets():
  image = np.zeros((6, 7, 5), np.float32)
  image[1:5, 2:6, 1:4] = 5.0
  image[2, 4, 2] = 0.0           # a hole, enclosed by the region in 3-D: filled, so inside it
  image[4, 5, 1:4] = 0.0         # a notch open to the outside: outside the region, though in its box
  labels = np.zeros(image.shape, np.uint8)
  labels[2:4, 3:5, 1] = 1
  labels[4, 5, 2] = 2            # a label in the notch stays; only background outside becomes -1
  labels[0, 0, 0] = 2            # outside the box: cropped away with it, as nnU-Net does
  cropped, seg, bbox = nnunet.crop_to_nonzero(image, labels)
  assert bbox == [[1, 5], [2, 6], [1, 4]] and cropped.shape == seg.shape == (4, 4, 3) and seg.dtype == np.int16
  expected = labels[1:5, 2:6, 1:4].astype(np.int16)
  expected[3, 3, [0, 2]] = nnunet.NONZERO_LABEL
  np.testing.assert_array_equal(seg, expected)
  np.testing.assert_array_equal(cropped, image[1:5, 2:6, 1:4])
  _, mask_only, same_bbox = nnunet.crop_to_nonzero(image)   # a new volume: the region alone
  notch = np.zeros(seg.shape, bool)
  notch[3, 3, :] = True
  np.testing.assert_array_equal(mask_only, np.where(notch, nnunet.NONZERO_LABEL, 0))
  assert same_bbox == bbox
  back = nnunet.uncrop(seg, bbox, image.shape)
  np.testing.assert_array_equal(back[1:5, 2:6, 1:4], seg)
  assert back.sum() == seg.sum() and back.shape == image.shape
  _, seg, bbox = nnunet.crop_to_nonzero(np.zeros((3, 4, 5)), np.zeros((3, 4, 5), np.uint8))  # nothing nonzero
  assert bbox == [[0, 3], [0, 4], [0, 5]] and (seg == 0).all()


def test_channel_names_pick_nnunets_normalization(tmp_path):
  names = ("CT", "ct", "noNorm", "zscore", "rescale_to_0_1", "rgb_to_0_1", "T2")
  assert [nnunet.normalization_of(n) for n in names] == [
      "CTNormalization", "CTNormalization", "NoNormalization", "ZScoreNormalization", "RescaleTo01Normalization",
      "RGBTo01Normalization", "ZScoreNormalization"]
  image = np.array([[10.0, 20.0], [30.0, 50.0]], np.float32)[..., None]
  stats = nnunet.intensity_stats(image, np.zeros(image.shape[:2], np.int16))
  plans_of = lambda name: {"modality": name, "channel_names": [name], "normalization": [nnunet.normalization_of(name)],
                           "intensity": [{}]}
  np.testing.assert_array_equal(nnunet.normalize(image, plans_of("noNorm"), stats), image)
  np.testing.assert_allclose(nnunet.normalize(image, plans_of("rescale_to_0_1"), stats)[..., 0], [[0, 0.25], [0.5, 1]])
  np.testing.assert_allclose(nnunet.normalize(image, plans_of("rgb_to_0_1"), stats), image / 255)
  z = nnunet.normalize(image, plans_of("T2"), stats)
  assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, 1e-5)

  raw = synthetic.nnunet_ct(str(tmp_path / "raw"), num_cases=2, modality="rescale_to_0_1", name="Dataset994_Rescale")
  plans = nnunet.preprocess(nnunet.read_raw(raw), str(tmp_path / "pre"), progress=False)
  # use_mask_for_norm is for z-scored channels only
  assert plans["normalization"] == ["RescaleTo01Normalization"] and plans["use_mask_for_norm"] == [False]
  sampler = nnunet.SliceSampler(str(tmp_path / "pre"), plans, ["synth_000", "synth_001"], (24, 24), 4, augment=False)
  batch = sampler.batch(0)["image"]
  assert batch.min() >= -1e-6 and batch.max() <= 1 + 1e-6 and batch.max() > 0.5
  rgb = synthetic.nnunet_ct(str(tmp_path / "raw_rgb"), num_cases=2, modality="rgb_to_0_1", name="Dataset995_RGB")
  with pytest.raises(nnunet.DatasetError, match=r"synth_000_0000.nii.gz: channel 'rgb_to_0_1' .* needs values in "
                                                r"0..255, found \[0, 1[0-9]{3}\]"):
    nnunet.preprocess(nnunet.read_raw(rgb), str(tmp_path / "pre_rgb"), progress=False)


def test_augmentations_are_batchgenerators_ops():
  """nnU-Net v2's low-resolution simulation and blur, against the torch ops batchgeneratorsv2 runs;
  BGContrast's even odds below and above 1; use_mask_for_norm's masking after augmentation."""
  import torch.nn.functional as F
  rng = np.random.default_rng(0)
  image = rng.standard_normal((37, 29)).astype(np.float32)
  t = torch.from_numpy(image)[None, None]
  for scale in (0.5, 0.73, 1.0):
    small = [round(n * scale) for n in image.shape]
    ref = F.interpolate(F.interpolate(t, small, mode="nearest-exact"), image.shape, mode="bilinear")[0, 0]
    np.testing.assert_allclose(nnunet._simulate_low_resolution(image, scale), ref.numpy(), atol=1e-5)

  def torch_blur(x, sigmas):  # batchgeneratorsv2's blur_dimension: kernel ~6 sigma wide, reflect padding
    for dim, sigma in enumerate(sigmas):
      size = int(round(sigma * 6 + 0.5)) | 1
      grid = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size)
      kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
      kernel = (kernel / kernel.sum()).reshape((1, 1, size, 1) if dim == 0 else (1, 1, 1, size))
      pad = [0, 0, size // 2, size // 2] if dim == 0 else [size // 2, size // 2, 0, 0]
      x = F.conv2d(F.pad(x, pad, mode="reflect"), kernel)
    return x[0, 0].numpy()
  from scipy import ndimage
  for sigmas in ((0.75, 1.0), (1.0, 0.75)):
    ours = ndimage.gaussian_filter(image, sigmas, mode="mirror", truncate=3.0)  # as _augment_intensities
    np.testing.assert_allclose(ours, torch_blur(t, sigmas), atol=1e-5)
  draws = np.array([nnunet._bg_contrast(rng, 0.7, 1.5) for _ in range(4000)])
  assert 0.46 < (draws < 1).mean() < 0.54 and draws.min() >= 0.7 and draws.max() <= 1.5

  # use_mask_for_norm: the image is 0 wherever the labels are negative (outside the nonzero region,
  # or off the slice), and those labels become background.
  labels = np.zeros((8, 8), np.int16)
  labels[:, :3] = nnunet.NONZERO_LABEL
  labels[4:, 4:] = 1
  cut_image, cut_labels = nnunet.augment_patch(np.ones((8, 8), np.float32), labels, (6.0, 6.0), (6, 6), rng, False,
                                               mask_outside=True)
  expected = np.zeros((6, 6), np.int32)
  expected[1:5, 1:5] = 1
  np.testing.assert_array_equal(cut_labels, expected)
  np.testing.assert_array_equal(cut_image[..., 0], np.pad(np.ones((5, 5)), ((0, 1), (0, 1))))  # off the slice: 0
  outside, inside = np.full((16, 16), nnunet.NONZERO_LABEL, np.int16), np.zeros((16, 16), np.int16)
  for step in range(20):   # whatever the augmentation draws, the masked region stays 0 and the rest not
    cut = [nnunet.augment_patch(np.ones((16, 16), np.float32), region, (8.0, 8.0), (6, 6),
                                np.random.default_rng(step), True, mask_outside=True) for region in (outside, inside)]
    assert not cut[0][0].any() and not cut[0][1].any() and (cut[1][0] != 0).all() and not cut[1][1].any()


class _ScriptedRng:
  """Draws an augmentation on purpose: random() from a list (then 0.99: nothing more applies), every
  uniform its upper bound, every normal zeros; the bounds and scales asked for are recorded."""

  def __init__(self, randoms):
    self.randoms, self.uniforms, self.normal_scales = list(randoms), [], []

  def random(self):
    return self.randoms.pop(0) if self.randoms else 0.99

  def uniform(self, lo, hi, size=None):
    self.uniforms.append((lo, hi))
    return hi if size is None else np.full(size, hi)

  def normal(self, loc, scale, size):
    self.normal_scales.append(scale)
    return np.zeros(size)


def test_spatial_and_noise_augmentations_draw_as_nnunet():
  """Scaling by s samples an s times wider region (objects shrink, as batchgeneratorsv2's
  SpatialTransform); an elongated patch turns by 15 degrees at most; the Gaussian noise's drawn
  "variance" (0-0.1) is its standard deviation, as batchgenerators uses it."""
  ramp = np.repeat(np.arange(64, dtype=np.float32)[:, None], 64, axis=1)
  labels = np.zeros((64, 64), np.int16)
  plain, _ = nnunet.augment_patch(ramp, labels, (32.0, 32.0), (8, 8), _ScriptedRng([]), False)
  scaled, _ = nnunet.augment_patch(ramp, labels, (32.0, 32.0), (8, 8), _ScriptedRng([0.5, 0.1]), True)
  assert plain[-1, 0, 0] - plain[0, 0, 0] == 7
  np.testing.assert_allclose(scaled[-1, 0, 0] - scaled[0, 0, 0], 7 * 1.4, rtol=1e-5)
  for patch, max_angle in (((32, 16), np.pi / 12), ((24, 16), np.pi)):
    rng = _ScriptedRng([0.1])
    nnunet.augment_patch(ramp, labels, (32.0, 32.0), patch, rng, True)
    assert rng.uniforms[0] == (-max_angle, max_angle)
  rng = _ScriptedRng([0.5, 0.5, 0.05])
  nnunet.augment_patch(ramp, labels, (32.0, 32.0), (8, 8), rng, True)
  assert rng.uniforms == [(0, 0.1)] and rng.normal_scales == [0.1]


def test_masked_mr_is_cropped_trained_and_predicted_on_its_nonzero_region(tmp_path):
  """nnU-Net's crop_to_nonzero and use_mask_for_norm: MR whose background is exactly 0 is cropped
  to the body, z-scored within it (0 outside), trained with the cropped-off background as
  background, and predicted back onto the original grid."""
  raw = synthetic.nnunet_ct(str(tmp_path / "raw"), num_cases=6, test_cases=1, modality="MRI",
                            name="Dataset993_SynthMR")
  dataset = nnunet.read_raw(raw)
  plans = nnunet.preprocess(dataset, str(tmp_path / "pre"), progress=False)
  assert plans["use_mask_for_norm"] == [True] and 0.4 < plans["median_relative_size_after_cropping"] < 0.75
  for case, (image_path, _) in dataset.cases.items():
    image, spacing = volumes.read_volume(image_path)
    stored = plans["cases"][case]
    box = tuple(slice(lo, hi) for lo, hi in stored["bbox"])
    assert np.count_nonzero(image[box]) == np.count_nonzero(image) and stored["shape_before_cropping"] == list(
        image.shape)
    seg = np.load(tmp_path / "pre" / f"{case}_seg.npy")
    slices = np.load(tmp_path / "pre" / f"{case}.npy")[..., 0]
    # z-scored within the body before resampling (test_preprocessing_is_nnunets_normalise_then_resample)
    assert slices[seg >= 0].mean() == pytest.approx(0, abs=0.02) and slices[seg >= 0].std() == pytest.approx(1, 0.1)
    assert (seg < 0).mean() > 0.05 and np.median(np.abs(slices[seg < 0])) < 0.01
    np.testing.assert_allclose(nnunet.prediction_slices(image, spacing, plans)[0][..., 0], slices, atol=1e-5)
  sampler = nnunet.SliceSampler(str(tmp_path / "pre"), plans, list(dataset.cases), (24, 24), 4, 0.5)
  assert min(sampler.batch(step)["label"].min() for step in range(5)) == 0

  args = ["segment", "--config", f"configs/segment.py:raw={raw},tiny=true,epochs=4,iters=30",
          "--config.optim.lr_backbone=3e-4", "--config.optim.lr_decoder=1e-3", "--no-progress",
          f"--config.data.preprocessed={tmp_path / 'pre'}", "--workdir", str(tmp_path / "run")]
  assert cli.main(args) == 0
  result = json.loads((tmp_path / "run" / "result.json").read_text())
  assert result["val"]["dice"]["liver"] > 0.5, result["val"]  # 0.82 here
  _, val_ids = nnunet.fold_cases(dataset, 0)
  truth, _ = volumes.read_labels(os.path.join(raw, "labelsTr", f"{val_ids[0]}.nii.gz"))
  predicted, _ = volumes.read_labels(str(tmp_path / "run" / "validation" / f"{val_ids[0]}.nii.gz"))
  assert predicted.shape == truth.shape and segmentation.dice_per_class(predicted, truth, [1])[1] == pytest.approx(
      result["val"]["per_case"][val_ids[0]]["dice"]["liver"])
  out = tmp_path / "predicted"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw, "imagesTs"),
                   "--out", str(out)]) == 0
  image, _ = volumes.read_volume(os.path.join(raw, "imagesTs", "synth_006_0000.nii.gz"))
  predicted, _ = volumes.read_labels(str(out / "synth_006.nii.gz"))
  truth, _ = volumes.read_labels(os.path.join(raw, "labelsTs", "synth_006.nii.gz"))
  _, _, bbox = nnunet.crop_to_nonzero(image)
  outside = np.ones(image.shape, bool)
  outside[tuple(slice(lo, hi) for lo, hi in bbox)] = False
  assert predicted.shape == image.shape and outside.any() and not predicted[outside].any()
  assert segmentation.dice_per_class(predicted, truth, [1])[1] > 0.3


# ------------------------------------------------------------------ end to end


def test_config_errors():
  with pytest.raises(ConfigError, match="unknown config argument 'patchsize'"):
    segment_config.get_config("patchsize=64")
  config = segment_config.get_config("tiny=true,patch=36")
  with pytest.raises(ConfigError, match="data.patch=36 is not a multiple of the patch size 8"):
    segment.build_segmenter(config, 3)
  config = segment_config.get_config("tiny=true,model=dinov2_vitb14")
  with pytest.raises(ConfigError, match="must be a DINOv3-family model"):
    segment.build_segmenter(config, 3)
  config = segment_config.get_config("tiny=true")
  config.optim.lr_decoder = -1.0
  with pytest.raises(ConfigError, match=r"optim.lr_decoder=-1.0 is outside \(0, inf\)"):
    segment.train(config, "/nonexistent/never-made")


def test_segment_command_line_misuse_is_named(tmp_path, capsys):
  for args, says in ((["--determine-postprocessing"], "--determine-postprocessing takes --workdir"),
                     (["--determine-postprocessing", "--out", "a.json", "--predict", "x"], "takes --workdir"),
                     (["--determine-postprocessing", "--out", "a.json", "--save-probabilities"], "takes --workdir"),
                     (["--config", "configs/segment.py:tiny=true", "--postprocessing", "p.json"],
                      "--postprocessing and --save-probabilities go with --predict"),
                     (["--config", "configs/segment.py:tiny=true", "--save-probabilities"],
                      "--save-probabilities go with --predict"),
                     (["--config", "configs/segment.py:tiny=true", "--fold", "1"],  # fold=1 in the config trains it
                      "--fold go with --import-nnunet"),
                     (["--determine-postprocessing", "--out", str(tmp_path)], "is a folder")):
    with pytest.raises(SystemExit) as exit_:
      cli.main(["segment", "--workdir", str(tmp_path / "run"), *args])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
  assert cli.main(["segment", "--workdir", str(tmp_path / "none"), "--determine-postprocessing",
                   "--out", str(tmp_path / "p.json")]) == 2
  assert "has no config.json: not an mfjax run folder" in capsys.readouterr().err


def test_segment_config_mistakes_fail_before_the_workdir_and_preprocessing(raw_ct, tmp_path, capsys):
  for arg, extra, says in ((",fold=abc", [], "data.fold='abc': a fold number 0..4 or 'all'"),
                           ("", ["--config.model.overrides.dept=4"], "unknown option(s) ['dept'] for model"),
                           ("", ["--config.model.dtype=fp16"], "unknown model.dtype 'fp16'")):
    assert cli.main(["segment", "--config", f"configs/segment.py:raw={raw_ct},tiny=true{arg}", *extra,
                     "--workdir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_backbone_checkpoint_must_cover_the_model(tmp_path):
  config = segment_config.get_config("tiny=true")
  model = segment.build_segmenter(config, 3)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
  fields = dict(segment_config.TINY_BACKBONE)
  for depth in (4, 2):
    backbone = models.create("meddinov3_vitb16", **{**fields, "depth": depth})
    models.save(str(tmp_path / f"depth{depth}"), "meddinov3_vitb16",
                models.init_params(backbone, jax.random.PRNGKey(depth), (32, 32)), {**fields, "depth": depth})
  config.model.checkpoint = str(tmp_path / "depth4")
  loaded = segment.load_backbone(config, variables)
  saved = models.load(str(tmp_path / "depth4"))[1]["params"]
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["foundation"], saved)
  assert jax.tree.map(np.shape, loaded["params"]["decoder"]) == jax.tree.map(np.shape, variables["params"]["decoder"])
  config.model.checkpoint = str(tmp_path / "depth2")  # the config's depth 4 overrides the checkpoint's 2
  with pytest.raises(ConfigError, match="missing blocks_2/"):
    segment.load_backbone(config, variables)


def test_multichannel_mr_trains_and_predicts_from_an_adapted_rgb_backbone(tmp_path):
  """nnU-Net's multi-channel inputs (CASE_0000, CASE_0001, ...: T2 and ADC here): each channel
  normalised on its own, stacked as the network's input channels; a converted RGB backbone fills
  the patch embedding as timm's adapt_input_conv does."""
  raw = synthetic.nnunet_ct(str(tmp_path / "raw"), num_cases=6, test_cases=1, channels=("T2", "ADC"),
                            name="Dataset996_SynthT2ADC")
  dataset = nnunet.read_raw(raw)
  assert dataset.channels == ("T2", "ADC") and dataset.channel_files["synth_000"][1].endswith("synth_000_0001.nii.gz")
  plans = nnunet.preprocess(dataset, str(tmp_path / "pre"), progress=False)
  assert plans["channel_names"] == ["T2", "ADC"] and plans["use_mask_for_norm"] == [True, True]
  stored = np.load(tmp_path / "pre" / "synth_000.npy")
  seg = np.load(tmp_path / "pre" / "synth_000_seg.npy")
  assert stored.shape == (*seg.shape, 2)
  for c in range(2):   # each channel z-scored on its own within the body, then resampled
    inside = stored[..., c][seg >= 0]
    assert inside.mean() == pytest.approx(0, abs=0.02) and inside.std() == pytest.approx(1, 0.1)
  batch = nnunet.SliceSampler(str(tmp_path / "pre"), plans, list(dataset.cases), (24, 24), 4).batch(0)
  assert batch["image"].shape == (4, 24, 24, 2)

  fields = dict(segment_config.TINY_BACKBONE)
  backbone = models.create("meddinov3_vitb16", **fields)
  models.save(str(tmp_path / "rgb"), "meddinov3_vitb16", models.init_params(backbone, jax.random.PRNGKey(1), (32, 32)),
              fields)
  rgb = models.load(str(tmp_path / "rgb"))[1]["params"]["patch_embed"]["kernel"]
  for channels, expected in ((2, rgb[:, :, :2] * 1.5), (4, np.concatenate([rgb, rgb[:, :, :1]], 2) * 0.75)):
    np.testing.assert_allclose(segment.adapt_patch_embed({"patch_embed": {"kernel": rgb}}, channels)[
        "patch_embed"]["kernel"], expected, rtol=1e-6)
  args = ["segment", "--config", f"configs/segment.py:raw={raw},tiny=true,epochs=4,iters=30",
          "--config.optim.lr_backbone=3e-4", "--config.optim.lr_decoder=1e-3", "--no-progress",
          f"--config.model.checkpoint={tmp_path / 'rgb'}", f"--config.data.preprocessed={tmp_path / 'pre'}",
          "--workdir", str(tmp_path / "run")]
  assert cli.main(args) == 0
  result = json.loads((tmp_path / "run" / "result.json").read_text())
  assert result["val"]["dice"]["liver"] > 0.5, result["val"]
  # A finished run predicts on its own: the backbone checkpoint and the shared preprocessed folder may be gone.
  import shutil
  os.rename(tmp_path / "rgb", tmp_path / "rgb_moved")
  shutil.rmtree(tmp_path / "pre")
  assert cli.main(args) == 0  # started again, the finished run returns its result without them too
  out = tmp_path / "predicted"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw, "imagesTs"),
                   "--out", str(out)]) == 0
  predicted, _ = volumes.read_labels(str(out / "synth_006.nii.gz"))
  truth, _ = volumes.read_labels(os.path.join(raw, "labelsTs", "synth_006.nii.gz"))
  assert sorted(os.listdir(out)) == ["synth_006.nii.gz"] and segmentation.dice_per_class(predicted, truth, [1])[1] > 0.5
  os.remove(os.path.join(raw, "imagesTs", "synth_006_0001.nii.gz"))   # a case without its ADC
  with pytest.raises(ConfigError, match=r"cases without every channel \(missing channel numbers\): synth_006 \[1\]"):
    segment.predict_folder(str(tmp_path / "run"), os.path.join(raw, "imagesTs"), str(tmp_path / "never"),
                           progress=False)


def test_prediction_inputs_are_grouped_by_case_and_channel(tmp_path):
  def folder(name, files):
    (tmp_path / name).mkdir()
    for f in files:
      (tmp_path / name / f).touch()
    return str(tmp_path / name)
  one = folder("one", ["case_0000.nii.gz", "patient_0001.nii.gz", "other.nii"])   # any name is a one-channel case
  assert {case: [os.path.basename(f) for f in files] for case, files in segment.input_cases(one, 1).items()} == {
      "case": ["case_0000.nii.gz"], "other": ["other.nii"], "patient_0001": ["patient_0001.nii.gz"]}
  two = folder("two", ["b_0001.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz"])
  assert {case: [os.path.basename(f) for f in files] for case, files in segment.input_cases(two, 2).items()} == {
      "a": ["a_0000.nii.gz", "a_0001.nii.gz"], "b": ["b_0000.nii.gz", "b_0001.nii.gz"]}
  with pytest.raises(ConfigError, match=r"missing channel numbers\): a \[1\]"):
    segment.input_cases(folder("missing", ["a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"]), 2)
  with pytest.raises(ConfigError, match="a_0002.nii.gz: channel 2, but the runs take 2"):
    segment.input_cases(folder("extra", ["a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz"]), 2)
  with pytest.raises(ConfigError, match=r"scan.nii.gz: the runs take 2 channels, named CASE_0000 ... CASE_0001"):
    segment.input_cases(folder("unnamed", ["scan.nii.gz"]), 2)
  with pytest.raises(ConfigError, match="no NIfTI volumes"):
    segment.input_cases(folder("empty", ["notes.txt"]), 1)
  # never one file silently in place of another
  with pytest.raises(ConfigError, match=r"several files for one case: c: c.nii.gz, c_0000.nii.gz"):
    segment.input_cases(folder("twice", ["c_0000.nii.gz", "c.nii.gz", "d.nii"]), 1)
  with pytest.raises(ConfigError, match=r"several files for one case: d: d.nii, d.nii.gz"):
    segment.input_cases(folder("endings", ["d.nii", "d.nii.gz"]), 1)
  with pytest.raises(ConfigError, match=r"e_0001.nii.gz: channel 1 of e, but the runs take one channel"):
    segment.input_cases(folder("stray", ["e_0000.nii.gz", "e_0001.nii.gz"]), 1)
  with pytest.raises(ConfigError, match=r"several files for channel 0 of f: f_0000.nii, f_0000.nii.gz"):
    segment.input_cases(folder("endings2", ["f_0000.nii", "f_0000.nii.gz", "f_0001.nii.gz"]), 2)


def _best_params(workdir):
  from mfjax.train.checkpoints import RunCheckpoints
  config = segment_config.get_config("tiny=true")
  model = segment.build_segmenter(config, 3)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))["params"]
  ckpts = RunCheckpoints(workdir)
  params, _ = ckpts.restore_best(abstract)
  ckpts.close()
  return params


def test_segment_trains_validates_resumes_and_predicts(raw_ct, tmp_path, monkeypatch, capsys):
  args = ["segment", "--config", f"configs/segment.py:raw={raw_ct},tiny=true,epochs=6,iters=40",
          "--config.optim.lr_backbone=3e-4", "--config.optim.lr_decoder=1e-3", "--config.eval.save_probabilities=true",
          "--no-progress"]
  assert cli.main(args + ["--workdir", str(tmp_path / "run")]) == 0
  result = json.loads((tmp_path / "run" / "result.json").read_text())
  assert result["val"]["cases"] == 2 and result["val"]["mean_dice"] > 0.6, result["val"]
  assert 0 < result["val"]["mean_nsd"] <= 1 and 0 < result["val"]["mean_hd95"] < 60, result["val"]
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  losses = [l["train/epoch_loss"] for l in lines if "train/epoch_loss" in l]
  assert len(losses) == 6 and losses[-1] < losses[0]

  # A validation case stored in LPS orientation: the written prediction lines up with its labels.
  _, val_ids = nnunet.fold_cases(nnunet.read_raw(raw_ct), 0)
  lps = next(c for c in val_ids if int(c[-3:]) % 3 == 2)
  predicted, _ = volumes.read_labels(str(tmp_path / "run" / "validation" / f"{lps}.nii.gz"))
  truth, _ = volumes.read_labels(os.path.join(raw_ct, "labelsTr", f"{lps}.nii.gz"))
  assert segmentation.dice_per_class(predicted, truth, [1])[1] == pytest.approx(
      result["val"]["per_case"][lps]["dice"]["liver"])
  # eval.save_probabilities: nnU-Net's npz and pkl beside each validation prediction (its --npz);
  # nnU-Net's export of their argmax is the prediction.
  import pickle
  from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
  assert sorted(os.listdir(tmp_path / "run" / "validation")) == sorted(
      f"{case}{ending}" for case in val_ids for ending in (".nii.gz", ".npz", ".pkl"))
  with open(tmp_path / "run" / "validation" / f"{lps}.pkl", "rb") as f:
    SimpleITKIO().write_seg(np.load(tmp_path / "run" / "validation" / f"{lps}.npz")["probabilities"].argmax(0),
                            str(tmp_path / "exported.nii.gz"), pickle.load(f))
  np.testing.assert_array_equal(volumes.read_labels(str(tmp_path / "exported.nii.gz"))[0], predicted)
  # ... laid out as nnU-Net's cross-validation: runs in RUNS/fold_F ensemble with an nnU-Net model
  # folder's fold_F/validation (here the same files, so the ensemble is the prediction).
  import shutil
  from benchmarks import nnunet_reference
  from nnunetv2.ensembling.ensemble import ensemble_crossvalidations
  os.makedirs(tmp_path / "cv_runs")
  os.symlink(tmp_path / "run", tmp_path / "cv_runs" / "fold_0")
  shutil.copytree(tmp_path / "run" / "validation", tmp_path / "cv_nnunet" / "fold_0" / "validation")
  (tmp_path / "cv_nnunet" / "plans.json").write_text(json.dumps(nnunet_reference.nnunet_plans([0, 1, 2], (0.8, 0.8),
                                                                                             (32, 32))))
  shutil.copy(os.path.join(raw_ct, "dataset.json"), tmp_path / "cv_nnunet" / "dataset.json")
  ensemble_crossvalidations([str(tmp_path / "cv_nnunet"), str(tmp_path / "cv_runs")], str(tmp_path / "cv_out"),
                            folds=(0,), num_processes=1)
  for case in val_ids:
    np.testing.assert_array_equal(volumes.read_labels(str(tmp_path / "cv_out" / f"{case}.nii.gz"))[0],
                                  volumes.read_labels(str(tmp_path / "run" / "validation" / f"{case}.nii.gz"))[0])
  unsaved = segment_config.get_config(f"raw={raw_ct},tiny=true")
  unsaved.eval.save_probabilities, unsaved.eval.save_predictions = True, False
  with pytest.raises(ConfigError, match="eval.save_probabilities=True .* needs eval.save_predictions=True"):
    segment.train(unsaved, str(tmp_path / "never"))

  # SIGTERM after step 50 (one epoch saved at 40): the run checkpoints, exits, and resumes to the
  # same final parameters as the uninterrupted run.
  batch = nnunet.SliceSampler.batch

  def interrupted(self, step, rows=None):
    if step == 50:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch(self, step, rows)
  monkeypatch.setattr(nnunet.SliceSampler, "batch", interrupted)
  shared = [f"--config.data.preprocessed={tmp_path / 'run' / 'preprocessed'}"]
  assert cli.main(args + shared + ["--workdir", str(tmp_path / "resumed")]) == 0
  assert not (tmp_path / "resumed" / "result.json").exists()
  monkeypatch.setattr(nnunet.SliceSampler, "batch", batch)
  assert cli.main(args + shared + ["--workdir", str(tmp_path / "resumed")]) == 0
  jax.tree.map(np.testing.assert_array_equal, _best_params(str(tmp_path / "run")),
               _best_params(str(tmp_path / "resumed")))
  # Started again, a finished run returns its result and changes nothing.
  finished = {name: (tmp_path / "resumed" / name).read_bytes() for name in ("result.json", "metrics.jsonl")}
  assert cli.main(args + shared + ["--workdir", str(tmp_path / "resumed")]) == 0
  assert finished == {name: (tmp_path / "resumed" / name).read_bytes() for name in finished}

  assert cli.main(["eval", "--workdir", str(tmp_path / "run")]) == 2  # not a classification run: a clear error

  # Predicting new volumes: one label volume per input, aligned with it.
  out = tmp_path / "predicted"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw_ct, "imagesTs"),
                   "--out", str(out)]) == 0
  assert sorted(os.listdir(out)) == ["synth_006.nii.gz", "synth_007.nii.gz"]
  for case in ("synth_006", "synth_007"):
    predicted, _ = volumes.read_labels(str(out / f"{case}.nii.gz"))
    truth, _ = volumes.read_labels(os.path.join(raw_ct, "labelsTs", f"{case}.nii.gz"))
    assert segmentation.dice_per_class(predicted, truth, [1, 2])[1] > 0.5
  # An interrupted prediction continues where it stopped: only the missing volume (here an empty
  # file, which another tool may leave) is predicted.
  first = volumes.read_labels(str(out / "synth_007.nii.gz"))[0]
  (out / "synth_007.nii.gz").write_bytes(b"")
  kept = os.stat(out / "synth_006.nii.gz").st_mtime_ns
  capsys.readouterr()
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw_ct, "imagesTs"),
                   "--out", str(out), "--continue-prediction", "--no-progress"]) == 0
  assert capsys.readouterr().out.split() == [str(out / "synth_007.nii.gz")]
  assert os.stat(out / "synth_006.nii.gz").st_mtime_ns == kept and sorted(os.listdir(out)) == [
      "synth_006.nii.gz", "synth_007.nii.gz"]
  np.testing.assert_array_equal(volumes.read_labels(str(out / "synth_007.nii.gz"))[0], first)
  # Never over an input: one-channel volumes named CASE.nii.gz predicted into their own folder.
  import nibabel as nib
  import shutil
  own = tmp_path / "own"
  own.mkdir()
  shutil.copy(os.path.join(raw_ct, "imagesTs", "synth_006_0000.nii.gz"), own / "synth_006.nii.gz")
  with pytest.raises(ConfigError, match="own is the input folder"):
    segment.predict_folder(str(tmp_path / "run"), str(own), str(own), progress=False)
  linked = tmp_path / "linked"  # an input that is a link to where its prediction would go
  linked.mkdir()
  os.symlink(own / "synth_006.nii.gz", linked / "synth_006.nii.gz")
  with pytest.raises(ConfigError, match="synth_006.nii.gz would replace that input image"):
    segment.predict_folder(str(tmp_path / "run"), str(linked), str(own), progress=False)
  # A .nii input gets a .nii prediction; a 2-D file stops the run before its first case.
  plain, plain_out = tmp_path / "plain", tmp_path / "plain_out"
  plain.mkdir()
  nib.save(nib.load(own / "synth_006.nii.gz"), plain / "synth_006.nii")
  nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), plain / "flat.nii.gz")
  with pytest.raises(volumes.VolumeError, match=r"flat.nii.gz: expected a 3-D volume, got shape \(8, 8\)"):
    segment.predict_folder(str(tmp_path / "run"), str(plain), str(plain_out), progress=False)
  assert os.listdir(plain_out) == []
  os.remove(plain / "flat.nii.gz")
  segment.predict_folder(str(tmp_path / "run"), str(plain), str(plain_out), progress=False)
  assert os.listdir(plain_out) == ["synth_006.nii"]
  np.testing.assert_array_equal(volumes.read_labels(str(plain_out / "synth_006.nii"))[0],
                                volumes.read_labels(str(out / "synth_006.nii.gz"))[0])

  # nnU-Net's postprocessing, determined on the validation predictions and applied when predicting.
  found = tmp_path / "postprocessing.json"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--determine-postprocessing", "--out", str(found),
                   "--no-progress"]) == 0
  decided = json.loads(found.read_text())
  assert decided["cases"] == 2 and decided["after"]["foreground_mean"] >= decided["before"]["foreground_mean"]
  pp_out = tmp_path / "predicted_pp"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw_ct, "imagesTs"),
                   "--out", str(pp_out), "--postprocessing", str(found), "--no-progress"]) == 0
  forced = dict(decided, steps=[[[1]], [[2]]])   # whatever was decided, each class's largest component
  (tmp_path / "forced.json").write_text(json.dumps(forced))
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw_ct, "imagesTs"),
                   "--out", str(tmp_path / "forced"), "--postprocessing", str(tmp_path / "forced.json"),
                   "--no-progress"]) == 0
  for case in ("synth_006", "synth_007"):
    plain = volumes.read_labels(str(out / f"{case}.nii.gz"))[0]
    for folder, steps in ((pp_out, decided["steps"]), (tmp_path / "forced", forced["steps"])):
      np.testing.assert_array_equal(volumes.read_labels(str(folder / f"{case}.nii.gz"))[0],
                                    segmentation.apply_postprocessing(plain, steps))
  (tmp_path / "other_labels.json").write_text(json.dumps(dict(decided, labels={"0": "background", "1": "spleen"})))
  with pytest.raises(ConfigError, match="other_labels.json was determined for other labels than the run's"):
    segment.predict_folder(str(tmp_path / "run"), os.path.join(raw_ct, "imagesTs"), str(tmp_path / "never"),
                           progress=False, postprocessing=str(tmp_path / "other_labels.json"))
  plans = segment.read_segment_run(str(tmp_path / "run"))[2]
  for steps, says in (([[5]], r"step \[5\] names label value\(s\) \[5\]"), ([["liver"]], "is not a label value"),
                      ([[]], "an empty step")):
    (tmp_path / "bad_steps.json").write_text(json.dumps(dict(decided, steps=steps)))
    with pytest.raises(ConfigError, match=says):
      segment.read_postprocessing(str(tmp_path / "bad_steps.json"), plans)

  # A fold ensemble (nnU-Net's default prediction): the runs' logits are averaged.
  fold1 = ["segment", "--config", f"configs/segment.py:raw={raw_ct},tiny=true,epochs=1,iters=10,fold=1",
           "--no-progress", *shared, "--workdir", str(tmp_path / "fold1")]
  assert cli.main(fold1) == 0
  ensembled = tmp_path / "ensembled"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--workdir", str(tmp_path / "fold1"),
                   "--predict", os.path.join(raw_ct, "imagesTs"), "--out", str(ensembled)]) == 0
  mesh = parallel.make_mesh()
  (plans, _, first), (_, _, second) = (segment.load_run(str(tmp_path / w), mesh) for w in ("run", "fold1"))
  image, spacing = volumes.read_volume(os.path.join(raw_ct, "imagesTs", "synth_006_0000.nii.gz"))
  slices, bbox, shape_xy = nnunet.prediction_slices(image, spacing, plans)
  one, two = first(slices), second(slices)
  assert np.abs(one - two).max() > 0.1
  expected = nnunet.uncrop(segmentation.labels_at_shape((one + two) / 2, shape_xy), bbox, image.shape)
  np.testing.assert_array_equal(volumes.read_labels(str(ensembled / "synth_006.nii.gz"))[0], expected)
  # A folder of folds stands for its numbered ones, as nnU-Net's default ensemble; fold_all is left out.
  for name, run in (("fold_0", "run"), ("fold_1", "fold1"), ("fold_all", "run")):
    os.makedirs(tmp_path / "folds", exist_ok=True)
    os.symlink(tmp_path / run, tmp_path / "folds" / name)
  assert segment.run_folders(str(tmp_path / "folds")) == [str(tmp_path / "folds" / f) for f in ("fold_0", "fold_1")]

  # --save-probabilities on a volume stored with permuted, flipped axes: nnU-Net's npz and pkl in
  # SimpleITKIO's array order (the file's voxel order), as its 3-D models' for nnUNetv2_ensemble.
  import nibabel as nib
  import pickle
  import SimpleITK as sitk
  from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
  source = os.path.join(raw_ct, "imagesTs", "synth_006_0000.nii.gz")
  os.makedirs(tmp_path / "turned")
  turned = str(tmp_path / "turned" / "synth_006_0000.nii.gz")
  nib.save(nib.load(source).as_reoriented([[2, -1], [0, 1], [1, -1]]), turned)
  with_probabilities = tmp_path / "with_probabilities"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--workdir", str(tmp_path / "fold1"),
                   "--predict", str(tmp_path / "turned"), "--out", str(with_probabilities), "--save-probabilities",
                   "--no-progress"]) == 0
  assert sorted(os.listdir(with_probabilities)) == ["synth_006.nii.gz", "synth_006.npz", "synth_006.pkl"]
  np.testing.assert_array_equal(volumes.read_labels(str(with_probabilities / "synth_006.nii.gz"))[0], expected)
  saved = np.load(with_probabilities / "synth_006.npz")["probabilities"]
  assert saved.shape == (3, *sitk.GetArrayFromImage(sitk.ReadImage(turned)).shape)
  np.testing.assert_allclose(saved.sum(0), 1, atol=1e-5)
  inside = segmentation.probabilities_of_logits(segmentation.logits_at_shape((one + two) / 2, shape_xy), False)
  outside = np.prod(image.shape) - inside[:, 0].size  # background, certain, outside the crop
  np.testing.assert_allclose(np.sort(saved, axis=None), np.sort(np.concatenate([
      inside.ravel(), np.ones(outside), np.zeros(2 * outside)])), atol=1e-6)
  with open(with_probabilities / "synth_006.pkl", "rb") as f:
    properties = pickle.load(f)
  written = str(tmp_path / "nnunet_export.nii.gz")  # nnU-Net's export of the argmax with our pkl
  SimpleITKIO().write_seg(saved.argmax(0), written, properties)
  np.testing.assert_array_equal(volumes.read_labels(written)[0], expected)
  reference = sitk.ReadImage(turned)
  for what in ("GetSpacing", "GetOrigin", "GetDirection"):
    np.testing.assert_allclose(getattr(sitk.ReadImage(written), what)(), getattr(reference, what)(), err_msg=what)
  # For an nnU-Net model that reads with NibabelIOWithReorient: its canonical order and affines.
  from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
  reoriented = tmp_path / "reoriented_probabilities"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--workdir", str(tmp_path / "fold1"),
                   "--predict", str(tmp_path / "turned"), "--out", str(reoriented), "--save-probabilities",
                   "--probabilities-reader", "NibabelIOWithReorient", "--no-progress"]) == 0
  canonical = np.load(reoriented / "synth_006.npz")["probabilities"]
  assert canonical.shape == (3, *image.shape[::-1])
  with open(reoriented / "synth_006.pkl", "rb") as f:
    NibabelIOWithReorient().write_seg(canonical.argmax(0), str(tmp_path / "nib_export.nii.gz"), pickle.load(f))
  np.testing.assert_array_equal(volumes.read_labels(str(tmp_path / "nib_export.nii.gz"))[0], expected)
  with pytest.raises(SystemExit):
    cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", str(tmp_path / "turned"), "--out",
              str(reoriented), "--probabilities-reader", "NibabelIO"])
  os.remove(with_probabilities / "synth_006.npz")   # a case is done when its npz and pkl are there too
  capsys.readouterr()
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--workdir", str(tmp_path / "fold1"),
                   "--predict", str(tmp_path / "turned"), "--out", str(with_probabilities), "--save-probabilities",
                   "--continue-prediction", "--no-progress"]) == 0
  assert capsys.readouterr().out.split() == [str(with_probabilities / "synth_006.nii.gz")]
  np.testing.assert_array_equal(np.load(with_probabilities / "synth_006.npz")["probabilities"], saved)
  with pytest.raises(SystemExit):   # training takes one workdir
    cli.main(["segment", "--config", "configs/segment.py:tiny=true", "--workdir", "a", "--workdir", "b"])


def test_slicing_follows_the_axis_of_largest_spacing_as_nnunets_transpose(raw_ct, tmp_path):
  """A dataset whose 3 mm axis is X (each synthetic volume's axes relabelled, Z <-> X) is sliced
  along X (nnU-Net's transpose_forward picks the axis of largest spacing): the slices are the
  axial dataset's, transposed; it trains as well, and its predictions line up with its labels."""
  import shutil
  import nibabel as nib
  assert [nnunet.slice_axis_of(s) for s in ((1, 1, 1), (0.8, 0.8, 3), (3, 0.8, 0.8), (0.8, 3, 0.8), (2, 2, 1))] == [
      2, 2, 0, 1, 1]
  assert nnunet.voxel_layout({"slice_axis": 0}) == (True, (1, 2, 0))
  assert nnunet.voxel_layout({}) == nnunet.voxel_layout({"slice_axis": 2}) == (True, None)
  turned = shutil.copytree(raw_ct, tmp_path / "Dataset990_SynthCT")
  for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
    for name in os.listdir(turned / folder):
      image = nib.load(turned / folder / name)
      zooms = image.header.get_zooms()
      nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj).transpose(2, 1, 0),
                               np.diag([zooms[2], zooms[1], zooms[0], 1.0])), turned / folder / name)
  axial = nnunet.preprocess(nnunet.read_raw(raw_ct), str(tmp_path / "pre_axial"), progress=False)
  plans = nnunet.preprocess(nnunet.read_raw(str(turned)), str(tmp_path / "pre"), progress=False)
  assert (axial["slice_axis"], plans["slice_axis"]) == (2, 0)
  assert plans["target_spacing_xy"] == axial["target_spacing_xy"][::-1]
  ras = next(c for c in sorted(plans["cases"]) if int(c[-3:]) % 3 != 2)  # the LPS cases are mirrored too
  ours, theirs = np.load(tmp_path / "pre" / f"{ras}.npy"), np.load(tmp_path / "pre_axial" / f"{ras}.npy")
  np.testing.assert_allclose(ours, theirs.transpose(0, 2, 1, 3), atol=1e-4)

  args = ["segment", "--config", f"configs/segment.py:raw={turned},tiny=true,epochs=6,iters=40",
          "--config.optim.lr_backbone=3e-4", "--config.optim.lr_decoder=1e-3", "--no-progress",
          f"--config.data.preprocessed={tmp_path / 'pre'}", "--workdir", str(tmp_path / "run")]
  assert cli.main(args) == 0
  result = json.loads((tmp_path / "run" / "result.json").read_text())
  assert result["val"]["mean_dice"] > 0.6, result["val"]
  for case, scores in result["val"]["per_case"].items():
    predicted, _ = volumes.read_labels(str(tmp_path / "run" / "validation" / f"{case}.nii.gz"))
    truth, _ = volumes.read_labels(str(turned / "labelsTr" / f"{case}.nii.gz"))
    assert segmentation.dice_per_class(predicted, truth, [1])[1] == pytest.approx(scores["dice"]["liver"])
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", str(turned / "imagesTs"),
                   "--out", str(tmp_path / "predicted"), "--no-progress"]) == 0
  predicted, _ = volumes.read_labels(str(tmp_path / "predicted" / "synth_006.nii.gz"))
  truth, _ = volumes.read_labels(str(turned / "labelsTs" / "synth_006.nii.gz"))
  assert segmentation.dice_per_class(predicted, truth, [1, 2])[1] > 0.5


def test_region_dataset_trains_scores_regions_and_predicts(tmp_path):
  """KiTS/BraTS-style nested regions: one sigmoid channel per region, nnU-Net's region loss,
  predictions written by regions_class_order, Dice / HD95 / NSD per region."""
  raw = synthetic.nnunet_ct(str(tmp_path / "raw"), num_cases=6, test_cases=1, regions=True,
                            name="Dataset991_SynthRegions")
  dataset = nnunet.read_raw(raw)
  assert dataset.regions == {"organs": (1, 2), "kidney": (2,)} and dataset.regions_class_order == (1, 2)
  plans = nnunet.preprocess(dataset, str(tmp_path / "pre"), progress=False)
  assert nnunet.targets(plans) == {1: (1, 2), 2: (2,)} and nnunet.num_outputs(plans) == 2
  locations = np.load(tmp_path / "pre" / "synth_000_locations.npy")
  seg = np.load(tmp_path / "pre" / "synth_000_seg.npy")
  assert set(locations[:, 0]) == {1, 2}   # sampled per region
  assert np.isin(seg[tuple(locations[locations[:, 0] == 1, 1:].T)], (1, 2)).all()
  assert (seg[tuple(locations[locations[:, 0] == 2, 1:].T)] == 2).all()

  args = ["segment", "--config", f"configs/segment.py:raw={raw},tiny=true,epochs=4,iters=30",
          "--config.optim.lr_backbone=3e-4", "--config.optim.lr_decoder=1e-3", "--no-progress",
          f"--config.data.preprocessed={tmp_path / 'pre'}", "--workdir", str(tmp_path / "run")]
  assert cli.main(args) == 0
  result = json.loads((tmp_path / "run" / "result.json").read_text())
  assert set(result["val"]["dice"]) == {"organs", "kidney"} and result["val"]["mean_dice"] > 0.4, result["val"]
  _, val_ids = nnunet.fold_cases(dataset, 0)
  predicted, _ = volumes.read_labels(str(tmp_path / "run" / "validation" / f"{val_ids[0]}.nii.gz"))
  assert set(np.unique(predicted)) <= {0, 1, 2}
  truth, _ = volumes.read_labels(os.path.join(raw, "labelsTr", f"{val_ids[0]}.nii.gz"))
  assert segmentation.dice_per_class(predicted, truth, {1: (1, 2)})[1] == pytest.approx(
      result["val"]["per_case"][val_ids[0]]["dice"]["organs"])
  out = tmp_path / "predicted"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw, "imagesTs"),
                   "--out", str(out), "--save-probabilities"]) == 0
  predicted, _ = volumes.read_labels(str(out / "synth_006.nii.gz"))
  truth, _ = volumes.read_labels(os.path.join(raw, "labelsTs", "synth_006.nii.gz"))
  assert segmentation.dice_per_class(predicted, truth, {1: (1, 2)})[1] > 0.5
  # the regions' sigmoids, which nnU-Net's LabelManager turns into the same labels
  import SimpleITK as sitk
  from nnunetv2.utilities.label_handling.label_handling import LabelManager
  saved = np.load(out / "synth_006.npz")["probabilities"]
  meta = json.loads(open(os.path.join(raw, "dataset.json")).read())
  manager = LabelManager(meta["labels"], meta["regions_class_order"])
  assert saved.shape[0] == 2 and 0 <= saved.min() and saved.max() <= 1 and (saved > 0.5).any()
  np.testing.assert_array_equal(manager.convert_probabilities_to_segmentation(saved),
                                sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synth_006.nii.gz"))))

  # Runs preprocessed differently cannot be ensembled: an error naming what differs.
  import shutil
  shutil.copytree(tmp_path / "run", tmp_path / "other")
  shutil.copytree(tmp_path / "pre", tmp_path / "pre_other")
  plans = json.loads((tmp_path / "pre_other" / "plans.json").read_text())
  for copy in (tmp_path / "pre_other" / "plans.json", tmp_path / "other" / "plans.json"):  # the run's own copy too
    copy.write_text(json.dumps(dict(plans, target_spacing_xy=[1.0, 1.0])))
  config = json.loads((tmp_path / "other" / "config.json").read_text())
  config["data"]["preprocessed"] = str(tmp_path / "pre_other")
  (tmp_path / "other" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="plans differ in target_spacing_xy"):
    segment.predict_folder([str(tmp_path / "run"), str(tmp_path / "other")], os.path.join(raw, "imagesTs"),
                           str(tmp_path / "never"), progress=False)


def test_postprocessing_keeps_largest_components_where_nnunets_search_finds_it_helps():
  truth = np.zeros((12, 12, 6), np.uint8)
  truth[1:5, 1:5, 1:5] = 1    # liver
  truth[7:10, 7:10, 1:4] = 2  # kidney, apart from the liver
  prediction = truth.copy()
  prediction[10:12, 0:2, 5] = 1   # a stray liver island: keeping liver's largest component removes it
  one = segmentation.keep_largest_component(prediction, [1])
  np.testing.assert_array_equal(one, truth)
  both = segmentation.keep_largest_component(prediction, [1, 2])  # all foreground as one: the kidney goes too
  assert not (both == 2).any() and (both[1:5, 1:5, 1:5] == 1).all()
  regions = segmentation.keep_largest_component(prediction, [(1, 2)])   # a region is the union of its values
  np.testing.assert_array_equal(regions, both)
  diagonal = np.zeros((3, 3, 1), np.uint8)
  diagonal[0, 0], diagonal[1, 1], diagonal[2, 2] = 1, 1, 1   # touching at corners: one component
  np.testing.assert_array_equal(segmentation.keep_largest_component(diagonal, [1]), diagonal)
  assert segmentation.nnunet_dice(prediction, truth, (2,)) == 1.0
  assert segmentation.nnunet_dice(np.full_like(truth, 2), np.zeros_like(truth), (2,)) == 0.0  # nnU-Net: not NaN
  assert np.isnan(segmentation.nnunet_dice(np.zeros_like(truth), np.zeros_like(truth), (2,)))

  cases = [(lambda: prediction, lambda: truth), (lambda: truth, lambda: truth)]
  logged = []
  found = segmentation.determine_postprocessing(cases, {"liver": (1,), "kidney": (2,)}, [1, 2], log=logged.append)
  assert found["steps"] == [[[1]]]   # not all foreground together (kidney worse), liver alone (better)
  assert found["after"]["mean"]["liver"] == 1.0 > found["before"]["mean"]["liver"]
  assert found["after"]["mean"]["kidney"] == found["before"]["mean"]["kidney"] == 1.0
  assert found["cases"] == 2 and len(logged) == 3 and "liver" in logged[1] and "applied" in logged[1]
  np.testing.assert_array_equal(segmentation.apply_postprocessing(prediction, found["steps"]), truth)

  # One reading for the first step and one for every class's: the same outcome as a reading per
  # candidate (nnU-Net's way, which regions need), whether the first step is taken or not.
  rng = np.random.default_rng(0)
  classes = {"liver": (1,), "kidney": (2,), "spleen": (3,)}
  for touching, expected in ((False, [[[2]]]), (True, [[[1], [2], [3]], [[2]]])):
    truths, predictions = [], []
    for k in range(5):
      labels = np.zeros((16, 16, 8), np.uint8)
      labels[2:8, 2:9, 1:6] = 1
      labels[(8 if touching else 10):12, 2:9, 2:5] = 2
      labels[3:6, (9 if touching else 11):13, 2:6] = 3
      noisy = labels.copy()
      if touching:   # one body: an island in a corner, a kidney voxel inside the liver
        noisy[14:16, 14:16, 6:8], noisy[4, 5, 3] = rng.integers(1, 4), 2
      else:          # stray voxels of one class per case, and the spleen missed in one case
        noisy[rng.random(labels.shape) < 0.03] = rng.integers(1, 4)
        noisy[labels == 3] = 0 if k == 0 else 3
      truths.append(labels)
      predictions.append(noisy)
    reads = {True: 0, False: 0}
    def counted(one_pass):
      def load(array):
        reads[one_pass] += 1
        return array
      return [(functools.partial(load, p), lambda t=t: t) for p, t in zip(predictions, truths)]
    fast, slow = (segmentation.determine_postprocessing(counted(one_pass), classes, [1, 2, 3], log=lambda _: None,
                                                        one_pass=one_pass) for one_pass in (True, False))
    assert fast == slow and fast["steps"] == expected and reads == {True: 2 * 5, False: (1 + 3) * 5}
  # 15 classes over 24 cases, strays of classes 1-7 only: the other classes' steps change nothing,
  # and their unchanged mean Dice must compare equal (a mean summed in another order need not).
  cases = []
  for k in range(24):
    labels = np.zeros((40, 40, 12), np.uint8)
    for value in range(1, 16):
      x, y, z = rng.integers(3, 37, 3)
      labels[x - 3:x + 3, y - 3:y + 3, max(z - 2, 0):z + 2] = value
    noisy = np.where(rng.random(labels.shape) < 0.01, rng.integers(1, 8, labels.shape), labels).astype(np.uint8)
    cases.append((lambda p=noisy: p, lambda t=labels: t))
  many = {f"class{v}": (v,) for v in range(1, 16)}
  fast, slow = (segmentation.determine_postprocessing(cases, many, range(1, 16), log=lambda _: None, one_pass=one_pass)
                for one_pass in (True, False))
  assert fast == slow and fast["steps"] == [[[v]] for v in range(1, 8)], fast["steps"]
  with pytest.raises(ValueError, match="regions overlap"):
    segmentation.determine_postprocessing(cases, {"organs": (1, 2), "kidney": (2,)}, [1, 2], one_pass=True)


def test_ignored_voxels_are_not_scored():
  truth = np.array([[0, 1, 1, 3], [0, 2, 3, 3]])[..., None]    # 3: nnU-Net's ignore label
  prediction = np.array([[1, 1, 0, 1], [0, 2, 2, 2]])[..., None]
  # liver: TP 1, FN 1, FP 1 (column 0) -- the prediction's 1 at an ignored voxel does not count
  assert segmentation.dice_per_class(prediction, truth, [1, 2], ignore_label=3) == {1: 0.5, 2: 1.0}
  assert segmentation.dice_per_class(prediction, truth, [2])[2] == pytest.approx(2 / 4)   # unmasked: 2 FPs
  surface = segmentation.surface_metrics(prediction, truth, [2], (1.0, 1.0, 1.0), ignore_label=3)
  assert surface["hd95"][2] == 0.0 and surface["nsd"][2] == 1.0


def test_sparse_annotations_train_on_annotated_voxels_only(tmp_path):
  """nnU-Net's ignore label: parsed from dataset.json, no output channel, patches centred on
  annotated voxels, left out of the loss and of the validation scores."""
  raw = synthetic.nnunet_ct(str(tmp_path / "raw"), num_cases=6, test_cases=1, sparse=True,
                            name="Dataset992_SynthSparse")
  dataset = nnunet.read_raw(raw)
  ignore = synthetic.SPARSE_IGNORE_LABEL
  assert dataset.ignore_label == ignore and dataset.num_classes == 3
  with_regions = nnunet.read_raw(synthetic.nnunet_ct(str(tmp_path / "raw_regions"), num_cases=2, sparse=True,
                                                     regions=True))
  assert with_regions.ignore_label == ignore and with_regions.regions == {"organs": (1, 2), "kidney": (2,)}
  plans = nnunet.preprocess(dataset, str(tmp_path / "pre"), progress=False)
  assert plans["ignore_label"] == ignore and nnunet.num_outputs(plans) == 3
  seg = np.load(tmp_path / "pre" / "synth_000_seg.npy")
  locations = np.load(tmp_path / "pre" / "synth_000_locations.npy")
  assert set(locations[:, 0]) == {nnunet.ANNOTATED, 1, 2}
  assert (seg[tuple(locations[locations[:, 0] == nnunet.ANNOTATED, 1:].T)] != ignore).all()
  # Patches that need no foreground are centred on an annotated voxel (odd size: a centre pixel),
  # though most voxels are ignored.
  assert (seg == ignore).mean() > 0.6
  sampler = nnunet.SliceSampler(str(tmp_path / "pre"), plans, ["synth_000"], (33, 33), 4, 0.0, augment=False)
  centres = [sampler.sample(step, i)[1][16, 16] for step in range(10) for i in range(4)]
  assert ignore not in centres

  # 28 % of the voxels annotated: it takes longer to learn than the dense data (mean Dice 0.25 at 6 x 40 steps).
  args = ["segment", "--config", f"configs/segment.py:raw={raw},tiny=true,epochs=8,iters=40",
          "--config.optim.lr_backbone=3e-4", "--config.optim.lr_decoder=1e-3", "--no-progress",
          f"--config.data.preprocessed={tmp_path / 'pre'}", "--workdir", str(tmp_path / "run")]
  assert cli.main(args) == 0
  result = json.loads((tmp_path / "run" / "result.json").read_text())
  assert set(result["val"]["dice"]) == {"liver", "kidney"} and result["val"]["dice"]["liver"] > 0.3, result["val"]
  _, val_ids = nnunet.fold_cases(dataset, 0)
  predicted, _ = volumes.read_labels(str(tmp_path / "run" / "validation" / f"{val_ids[0]}.nii.gz"))
  truth, _ = volumes.read_labels(os.path.join(raw, "labelsTr", f"{val_ids[0]}.nii.gz"))
  assert set(np.unique(predicted)) <= {0, 1, 2} and (truth == ignore).any()
  assert segmentation.dice_per_class(predicted, truth, [1], ignore_label=ignore)[1] == pytest.approx(
      result["val"]["per_case"][val_ids[0]]["dice"]["liver"])
  out = tmp_path / "predicted"
  assert cli.main(["segment", "--workdir", str(tmp_path / "run"), "--predict", os.path.join(raw, "imagesTs"),
                   "--out", str(out)]) == 0
  predicted, _ = volumes.read_labels(str(out / "synth_006.nii.gz"))
  truth, _ = volumes.read_labels(os.path.join(raw, "labelsTs", "synth_006.nii.gz"))   # dense
  print("sparse-trained Dice on the dense test case:", segmentation.dice_per_class(predicted, truth, [1, 2]))
  assert segmentation.dice_per_class(predicted, truth, [1])[1] > 0.3


def test_cli_names_a_missing_checkpoint_in_one_line(raw_ct, tmp_path, capsys):
  missing = str(tmp_path / "no_such_model")
  assert cli.main(["segment", "--config", f"configs/segment.py:raw={raw_ct},tiny=true", "--no-progress",
                   f"--config.model.checkpoint={missing}", "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert f"error: {missing}/model.json not found" in err and "Traceback" not in err


def test_a_resumed_run_keeps_its_split(tmp_path):
  segment.check_split(tmp_path, ["a", "b", "c"], ["d"])
  segment.check_split(tmp_path, ["b", "a", "c"], ["d"])  # nothing saved yet: a corrected split is taken
  assert json.loads((tmp_path / "split.json").read_text()) == {"train": ["b", "a", "c"], "validation": ["d"]}
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)  # a checkpoint: the run has started for real
  segment.check_split(tmp_path, ["b", "a", "c"], ["d"])
  with pytest.raises(ConfigError, match=r"another split of the cases \(2 training and 2 validation cases differ"):
    segment.check_split(tmp_path, ["a", "b", "d"], ["c"])
  with pytest.raises(ConfigError, match="or their order"):  # the sampler draws cases by position
    segment.check_split(tmp_path, ["a", "b", "c"], ["d"])
