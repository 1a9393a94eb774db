"""grain pipeline: torchvision-equal transforms, determinism, resumable state, exact eval coverage."""
import json

import numpy as np
import PIL.Image
import pytest
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import mfjax.data
from mfjax.data import images, pipeline, synthetic, transforms

MEAN, STD = (0.415, 0.221, 0.073), (0.275, 0.150, 0.081)


def _photo(size=(300, 260), gray=False):
  rng = np.random.default_rng(1)
  base = synthetic.fundus_image(rng, 3, max(size))[: size[1], : size[0]]
  base = np.clip(base.astype(np.int16) + rng.integers(0, 60, base.shape), 0, 255).astype(np.uint8)
  image = PIL.Image.fromarray(base, "RGB")
  return image.convert("L") if gray else image


@pytest.mark.parametrize("resolution", [224, 64])
@pytest.mark.parametrize("gray", [False, True])
def test_eval_transform_equals_torchvision(resolution, gray):
  image = _photo(gray=gray)
  mean, std = ((0.503,), (0.292,)) if gray else (MEAN, STD)
  size = round(resolution * 256 / 224)
  ref = T.Compose([T.Resize((size, size)), T.CenterCrop(resolution), T.ToTensor(), T.Normalize(mean, std)])(image)
  ref = ref.permute(1, 2, 0).numpy()
  ours = transforms.eval_image(image, resolution, mean, std, gray_to_rgb=False)
  assert ours.shape == ref.shape and ours.dtype == np.float32
  assert np.max(np.abs(ours - ref)) <= 1e-6
  if gray:  # expanded to three identical channels by default
    three = transforms.eval_image(image, resolution, mean, std)
    assert three.shape == (resolution, resolution, 3) and np.array_equal(three[..., 2], ours[..., 0])


def test_train_ops_equal_torchvision_for_the_same_draws():
  image = _photo()
  for seed in range(12):
    ours = transforms.train_image(image, np.random.default_rng(seed), 224, MEAN, STD)
    # Replay the same draws through torchvision's functional ops, in the same order.
    rng = np.random.default_rng(seed)
    x = TF.center_crop(TF.resize(image, [256, 256]), [224, 224])
    top, left, h, w = transforms.random_resized_crop_box(rng, 224, 224)
    x = TF.resized_crop(x, top, left, h, w, [224, 224], T.InterpolationMode.BILINEAR)
    if rng.random() < 0.5:
      x = TF.vflip(x)
    if rng.random() < 0.5:
      x = TF.hflip(x)
    if rng.random() < 0.8:
      order = rng.permutation(4)
      factors = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)
      ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
      for i in order:
        x = ops[i](x, float(factors[i]))
    ref = TF.normalize(TF.to_tensor(x), MEAN, STD).permute(1, 2, 0).numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-6, seed


def test_jpeg_draft_decode_is_close_to_full_decode():
  import io
  big = _photo(size=(512, 512)).resize((512, 512))
  buffer = io.BytesIO()
  big.save(buffer, format="JPEG", quality=95)
  data = buffer.getvalue()
  full = images.decode(data, 3)
  small = images.decode(data, 3, draft_size=transforms.resize_size(64))
  assert full.size == (512, 512) and small.size == (128, 128)  # 1/4 scale, still >= 73
  a = transforms.eval_image(full, 64, MEAN, STD)
  b = transforms.eval_image(small, 64, MEAN, STD)
  assert np.mean(np.abs(a - b)) < 0.05 * np.mean(np.abs(a))


def test_random_resized_crop_box_follows_torchvision_rules():
  rng = np.random.default_rng(0)
  boxes = np.array([transforms.random_resized_crop_box(rng, 224, 224) for _ in range(2000)])
  top, left, h, w = boxes.T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 224) & (left + w <= 224))
  area = h * w / 224 ** 2
  assert area.min() >= 0.8 - 0.02 and area.max() <= 1.0
  assert np.all((w / h >= 3 / 4 - 0.02) & (w / h <= 4 / 3 + 0.02))
  assert np.mean((h == 224) & (w == 224)) > 0.01  # the centre-crop fallback after ten misses
  wide = transforms.random_resized_crop_box(np.random.default_rng(0), 1000, 100, scale=(5.0, 6.0))
  assert wide == (0, (1000 - 133) // 2, 100, 133)  # fallback clamps the aspect ratio


@pytest.fixture(scope="module")
def aptos(module_tmp):
  root = module_tmp.mktemp("pipeline")
  manual = synthetic.aptos2019(str(root / "aptos"), num_images=40, size=48)
  return mfjax.data.build("aptos2019", manual, str(root / "tfds"))


def _collect(loader):
  return [jax_free(b) for b in loader]


def jax_free(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def test_train_batches_labels_and_images(aptos):
  loader = mfjax.data.make_loader(aptos, "train", batch_size=8, train=True, resolution=32, seed=3,
                                  shard_index=0, shard_count=1)
  batches = _collect(loader)
  assert len(batches) == aptos.split_sizes["train"] // 8 == 3 == mfjax.data.steps_per_epoch(28, 8)
  assert mfjax.data.steps_per_epoch(28, 8, drop_remainder=False) == 4
  source = aptos.source("train")
  for b in batches:
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["valid"].all()
    assert [int(source[int(i)]["label"]) for i in b["index"]] == b["label"].tolist()
  indices = np.concatenate([b["index"] for b in batches])
  assert len(set(indices.tolist())) == 24  # one epoch: distinct records, remainder dropped


def test_augmentation_depends_only_on_seed_epoch_and_index(aptos):
  common = dict(batch_size=8, train=True, resolution=32, seed=5, num_epochs=2)
  whole = _collect(mfjax.data.make_loader(aptos, "train", shard_index=0, shard_count=1, **common))
  halves = [_collect(mfjax.data.make_loader(aptos, "train", shard_index=p, shard_count=2, **common))
            for p in range(2)]
  assert len(whole) == len(halves[0]) == len(halves[1]) == 6
  for step, batch in enumerate(whole):
    for key in batch:  # each process holds its rows of the global batch, bit for bit
      np.testing.assert_array_equal(batch[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))
  again = _collect(mfjax.data.make_loader(aptos, "train", shard_index=0, shard_count=1, **common))
  np.testing.assert_array_equal(whole[4]["image"], again[4]["image"])
  # The same record in the next epoch gets a different augmentation.
  first = {int(i): img for b in whole[:3] for i, img in zip(b["index"], b["image"])}
  second = {int(i): img for b in whole[3:] for i, img in zip(b["index"], b["image"])}
  shared = sorted(set(first) & set(second))
  assert shared and not any(np.array_equal(first[i], second[i]) for i in shared)
  other_seed = _collect(mfjax.data.make_loader(aptos, "train", shard_index=0, shard_count=1,
                                               **{**common, "seed": 6}))
  assert not np.array_equal(other_seed[0]["index"], whole[0]["index"])


def test_restored_iterator_yields_exactly_the_remaining_batches(aptos):
  def make():
    return mfjax.data.make_loader(aptos, "train", batch_size=4, train=True, resolution=32, seed=1,
                                  num_epochs=2, shard_index=0, shard_count=1)
  it = iter(make())
  for _ in range(9):  # mid-way through the second epoch (7 batches per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  remaining = [jax_free(b) for b in it]
  assert len(remaining) == 14 - 9
  resumed = iter(make())
  resumed.set_state(state)
  again = [jax_free(b) for b in resumed]
  assert len(again) == len(remaining)
  for a, b in zip(remaining, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_eval_loader_scores_every_example_exactly_once(aptos):
  n = aptos.split_sizes["validation"]
  seen, padding = [], 0
  for p in range(2):
    batches = _collect(mfjax.data.make_eval_loader(aptos, "validation", batch_size=4, resolution=32,
                                                   shard_index=p, shard_count=2))
    assert len(batches) == -(-n // 4)  # every process runs the same number of steps
    for b in batches:
      seen += b["index"][b["valid"]].tolist()
      padding += int(np.sum(~b["valid"]))
  assert sorted(seen) == list(range(n)) and padding == -(-n // 4) * 4 - n > 0
  source = aptos.source("validation")
  first = _collect(mfjax.data.make_eval_loader(aptos, "validation", batch_size=2, resolution=32,
                                               shard_index=0, shard_count=1))[0]
  expected = transforms.eval_image(images.decode(source[0]["image"], 3), 32, aptos.spec.mean, aptos.spec.std)
  np.testing.assert_array_equal(first["image"][0], expected)


def test_model_normalization_and_loader_errors(aptos):
  b = next(iter(mfjax.data.make_eval_loader(aptos, "test", batch_size=2, resolution=32, norm=((0.5,) * 3, (0.25,) * 3),
                                            shard_index=0, shard_count=1)))
  raw = images.decode(aptos.source("test")[0]["image"], 3)
  np.testing.assert_allclose(b["image"][0], transforms.eval_image(raw, 32, (0.5,) * 3, (0.25,) * 3))
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 data-loading processes"):
    mfjax.data.make_loader(aptos, "train", batch_size=6, train=True, shard_index=0, shard_count=4)
  with pytest.raises(ValueError, match="fewer than one batch"):
    mfjax.data.make_loader(aptos, "test", batch_size=64, train=True, shard_index=0, shard_count=1)
  with pytest.raises(mfjax.data.DataError, match="no split 'val'"):
    mfjax.data.make_loader(aptos, "val", batch_size=4, train=True, shard_index=0, shard_count=1)


def test_uncertainty_policies():
  codes = np.array([-2, 1, 0, -1, -2], np.int8)
  label, mask = pipeline.label_policy(codes, "zeros")
  assert label.tolist() == [0, 1, 0, 0, 0] and mask.tolist() == [1] * 5
  label, mask = pipeline.label_policy(codes, "ones")
  assert label.tolist() == [0, 1, 0, 1, 0] and mask.tolist() == [1] * 5
  label, mask = pipeline.label_policy(codes, "ignore")
  assert label.tolist() == [0, 1, 0, 0, 0] and mask.tolist() == [1, 1, 1, 0, 1]
  nothing = np.array([-2, 0, -1, 0], np.int8)
  assert pipeline.label_policy(nothing, "zeros", no_finding_fill=True)[0].tolist() == [1, 0, 0, 0]
  assert pipeline.label_policy(nothing, "ones", no_finding_fill=True)[0].tolist() == [0, 0, 1, 0]
  with pytest.raises(ValueError, match="valid policies"):
    pipeline.label_policy(codes, "u_zeros")


def test_chexpert_loader_gray_labels_and_mask(tmp_path):
  manual = synthetic.chexpert(str(tmp_path / "cx"), num_patients=10, size=40)
  ds = mfjax.data.build("chexpert", manual, str(tmp_path / "tfds"))
  b = next(iter(mfjax.data.make_loader(ds, "train", batch_size=4, train=True, resolution=32,
                                       uncertainty="ignore", shard_index=0, shard_count=1)))
  assert b["image"].shape == (4, 32, 32, 3) and np.array_equal(b["image"][..., 0], b["image"][..., 2])
  source = ds.source("train")
  for row, index in enumerate(b["index"]):
    codes = source[int(index)]["labels"]
    np.testing.assert_array_equal(b["label"][row], codes == 1)
    np.testing.assert_array_equal(b["mask"][row], codes != -1)
  one = next(iter(mfjax.data.make_loader(ds, "train", batch_size=4, train=True, resolution=32,
                                         gray_to_rgb=False, shard_index=0, shard_count=1)))
  assert one["image"].shape == (4, 32, 32, 1)


def test_worker_processes_give_the_same_batches_and_resume(aptos):
  def make(workers):
    return mfjax.data.make_loader(aptos, "train", batch_size=4, train=True, resolution=24, seed=2,
                                  num_epochs=1, shard_index=0, shard_count=1, worker_count=workers)
  inline = _collect(make(0))
  it = iter(make(1))
  head = [jax_free(next(it)) for _ in range(3)]
  state = it.get_state()
  it.close()
  resumed = iter(make(1))
  resumed.set_state(state)
  tail = [jax_free(b) for b in resumed]
  resumed.close()
  assert len(head) + len(tail) == len(inline)
  for a, b in zip(inline, head + tail):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["index"], b["index"])
