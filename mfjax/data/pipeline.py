"""grain input pipelines over built datasets: deterministic, resumable, multi-host.

Order. Each epoch is one permutation of the split, drawn from (seed, epoch); it is cut
into global batches of `batch_size`, and each process takes the rows of every global batch that
its devices hold (`sharding=`: `parallel.process_rows`, interleaved on a TPU pod), or process p
of P rows [p * batch_size / P, (p + 1) * batch_size / P) (`shard_index`/`shard_count`, or
neither). So every process reads only its own examples, and the global batch (see
`global_batch`) is the same whatever the number of processes. Training drops the last partial
global batch (as the paper's `drop_last=True`). Evaluation never drops: the last batch is padded
with copies of record 0 marked `valid=False`, so every example is scored exactly once (the
paper's validation loader shuffled and dropped a random remainder; this one does not).

Augmentation. The random train transforms of an example draw from a generator seeded by
(seed, epoch, record index): deterministic, and independent of sharding, worker count and
batch position.

Batches are dicts of NumPy arrays:
  image  (B, R, R, 3) float32, normalized (1 channel if gray_to_rgb=False on a gray dataset)
  label  (B,) int32 class ids, or (B, C) float32 multi-hot for multi-label datasets
  mask   (B, C) float32, multi-label only: 1 where the label counts in the loss and the
         metric (all ones except for uncertain CheXpert labels under uncertainty='ignore')
  index  (B,) int64 record index within the split
  valid  (B,) bool, False on padding rows

State. `iter(loader)` is a grain DatasetIterator; `get_state()` / `set_state()` resume
mid-epoch exactly (also through `grain.checkpoint.CheckpointSave/Restore` in Orbax).
"""
import signal
import sys

import absl.flags
import grain
import jax
import numpy as np

from mfjax import parallel
from mfjax.config import ConfigError, DataError
from mfjax.data import images, transforms

UNCERTAINTY_POLICIES = ("zeros", "ones", "ignore")


def label_policy(codes: np.ndarray, policy: str, no_finding_fill: bool = False):
  """(label, mask) float32 from CheXpert-style codes 1 / 0 / -1 uncertain / -2 blank.

  zeros: uncertain and blank are negative (U-Zeros). With `no_finding_fill` (CheXpert), an
         example left with no positive gets No Finding (label 0) = 1, as the paper's code.
  ones:  uncertain is positive, blank negative (U-Ones).
  ignore: uncertain is masked out of loss and metric, blank negative.
  """
  codes = np.asarray(codes)
  if policy == "zeros":
    label = codes == 1
    if no_finding_fill and not label.any():
      label = label.copy()
      label[0] = True
    mask = np.ones(codes.shape, bool)
  elif policy == "ones":
    label, mask = (codes == 1) | (codes == -1), np.ones(codes.shape, bool)
  elif policy == "ignore":
    label, mask = codes == 1, codes != -1
  else:
    raise ValueError(f"uncertainty={policy!r}; valid policies are {list(UNCERTAINTY_POLICIES)}")
  return label.astype(np.float32), mask.astype(np.float32)


class _Order:
  """Local element i -> (record index, epoch, valid) for one process (see module docstring)."""

  def __init__(self, num_records, global_batch, rows, shuffle, seed, pad):
    self.num_records, self.global_batch, self.rows = num_records, global_batch, rows
    self.local_batch, self.shuffle, self.seed = len(rows), shuffle, seed
    self.steps_per_epoch = (-(-num_records // global_batch) if pad else num_records // global_batch)
    self._cached = (None, None)

  def _permutation(self, epoch):
    cached_epoch, permutation = self._cached  # one read: other reader threads may replace it
    if cached_epoch != epoch:
      permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
      self._cached = (epoch, permutation)
    return permutation

  def __call__(self, i):
    step, row = divmod(int(i), self.local_batch)
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    position = step_in_epoch * self.global_batch + int(self.rows[row])
    if position >= self.num_records:
      return 0, epoch, False
    key = int(self._permutation(epoch)[position]) if self.shuffle else position
    return key, epoch, True


class _Load:
  """(record index, epoch, valid) -> one example dict (see module docstring)."""

  def __init__(self, source, spec, resolution, train, seed, mean, std, gray_to_rgb, uncertainty, jpeg_draft):
    self.source, self.spec, self.resolution, self.train, self.seed = source, spec, resolution, train, seed
    self.mean, self.std, self.gray_to_rgb, self.uncertainty = mean, std, gray_to_rgb, uncertainty
    self.draft_size = transforms.resize_size(resolution) if jpeg_draft else None

  def __call__(self, element):
    key, epoch, valid = element
    record = self.source[key]
    image = images.decode(record["image"], self.spec.channels, draft_size=self.draft_size)
    if self.train:
      rng = np.random.default_rng([self.seed, epoch, key, 0x5EED])
      pixels = transforms.train_image(image, rng, self.resolution, self.mean, self.std, self.gray_to_rgb)
    else:
      pixels = transforms.eval_image(image, self.resolution, self.mean, self.std, self.gray_to_rgb)
    out = {"image": pixels, "index": np.int64(key), "valid": np.bool_(valid)}
    if self.spec.multi_label:
      out["label"], out["mask"] = label_policy(record["labels"], self.uncertainty,
                                               no_finding_fill=self.spec.name == "chexpert")
    else:
      out["label"] = np.int32(record["label"])
    return out


def _local_rows(batch_size, shard_index, shard_count, sharding) -> np.ndarray:
  """The rows of each global batch this process yields, in order (see the module docstring)."""
  if sharding is not None:
    if shard_index is not None or shard_count is not None:
      raise ValueError("pass sharding, or shard_index and shard_count, not both")
    devices = sharding.num_devices if hasattr(sharding, "num_devices") else sharding.devices.size
    if batch_size % devices:
      raise ConfigError(f"batch_size={batch_size} is not divisible by the {devices} devices")
    return parallel.process_rows(sharding, batch_size)
  if shard_index is None and shard_count is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError("pass both shard_index and shard_count, or neither (then: this JAX process)")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is outside [0, shard_count={shard_count})")
  if batch_size % shard_count:
    raise ConfigError(f"batch_size={batch_size} is not divisible by the {shard_count} data-loading processes")
  local_batch = batch_size // shard_count
  return np.arange(shard_index * local_batch, (shard_index + 1) * local_batch)


def steps_per_epoch(num_records: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Global batches per epoch for a split of `num_records` examples."""
  return num_records // batch_size if drop_remainder else -(-num_records // batch_size)


def make_loader(dataset, split: str, *, batch_size: int, train: bool, resolution: int = 224,
                seed: int = 0, num_epochs: int | None = 1, shard_index: int | None = None,
                shard_count: int | None = None, sharding=None, worker_count: int = 0, read_threads: int = 2,
                prefetch: int = 2, norm=None, drop_remainder: bool | None = None,
                uncertainty: str = "zeros", gray_to_rgb: bool = True, augment: bool | None = None,
                jpeg_draft: bool = False) -> grain.IterDataset:
  """A grain IterDataset of this process's share of `split` of a built `mfjax.data.Dataset`.

  batch_size: the GLOBAL batch size; each process yields the rows its devices hold under
    `sharding` (the batch's jax Sharding, or a Mesh), or, without it, each of the `shard_count`
    processes batch_size / shard_count consecutive rows (shard defaults: this JAX process).
  train: shuffle each epoch and apply the train transforms; otherwise sequential order and
    eval transforms.
  num_epochs: epochs to yield; None repeats forever.
  norm: (mean, std) to use instead of the dataset's constants (e.g. a model's).
  drop_remainder: default True for train, False (pad, with `valid`) otherwise.
  augment: apply the random train transforms (default: `train`); False with train=True
    shuffles and drops the remainder but uses the eval transforms.
  worker_count: grain worker processes (0: decode in this process, with `read_threads`
    threads); `prefetch` batches are buffered.
  uncertainty: multi-label uncertainty policy, see `label_policy`.
  jpeg_draft: decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below the resize size):
    several times faster, pixels slightly different from torchvision's full decode.
  """
  spec = dataset.spec
  rows = _local_rows(batch_size, shard_index, shard_count, sharding)
  if num_epochs is not None and num_epochs < 1:
    raise ConfigError(f"num_epochs={num_epochs} must be >= 1 or None")
  if uncertainty not in UNCERTAINTY_POLICIES:
    raise ConfigError(f"uncertainty={uncertainty!r}; valid policies are {list(UNCERTAINTY_POLICIES)}")
  drop_remainder = train if drop_remainder is None else drop_remainder
  mean, std = norm if norm is not None else (spec.mean, spec.std)
  source = dataset.source(split)
  num_records = len(source)
  local_batch = len(rows)
  order = _Order(num_records, batch_size, rows, shuffle=train, seed=seed, pad=not drop_remainder)
  if order.steps_per_epoch == 0:
    raise DataError(f"{dataset.path}: split {split!r} has {num_records} examples, fewer than one batch of "
                    f"{batch_size}: lower batch_size, or give the split more examples")
  epochs = num_epochs if num_epochs is not None else sys.maxsize // (order.steps_per_epoch * local_batch)
  augment = train if augment is None else augment
  load = _Load(source, spec, resolution, augment, seed, tuple(mean), tuple(std), gray_to_rgb, uncertainty,
               jpeg_draft)
  ds = (grain.MapDataset.range(epochs * order.steps_per_epoch * local_batch)
        .map(order).map(load).batch(local_batch))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    if not absl.flags.FLAGS.is_parsed():
      absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags in its worker processes
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch),
                        worker_init_fn=_leave_ctrl_c_to_the_trainer)
  return ds


def _leave_ctrl_c_to_the_trainer(worker_index: int, worker_count: int) -> None:
  """In each grain worker: a terminal's Ctrl-C reaches the whole process group; the trainer saves a
  checkpoint and stops (parallel.Preemption), and its workers must serve it until then."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Rows:
  """(record index, epoch, valid) -> one row of in-memory arrays, in the loader's batch format."""

  def __init__(self, arrays: dict):
    self.arrays = arrays

  def __call__(self, element):
    key, _, valid = element
    out = {name: values[key] for name, values in self.arrays.items()}
    out.update(index=np.int64(key), valid=np.bool_(valid))
    return out


def make_array_loader(arrays: dict, *, batch_size: int, train: bool, seed: int = 0,
                      num_epochs: int | None = 1, shard_index: int | None = None,
                      shard_count: int | None = None, sharding=None,
                      drop_remainder: bool | None = None) -> grain.IterDataset:
  """`make_loader`'s order, sharding, padding and resumable state over in-memory arrays.

  For data computed once, such as a frozen foundation's features: `arrays` maps names to
  arrays with one row per example (e.g. {"image": features, "label": labels}). `train`
  shuffles each epoch; there are no transforms.
  """
  sizes = {name: len(values) for name, values in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays must have the same number of rows, got {sizes}")
  num_records = next(iter(sizes.values()))
  rows = _local_rows(batch_size, shard_index, shard_count, sharding)
  drop_remainder = train if drop_remainder is None else drop_remainder
  local_batch = len(rows)
  order = _Order(num_records, batch_size, rows, shuffle=train, seed=seed, pad=not drop_remainder)
  if order.steps_per_epoch == 0:
    raise DataError(f"{num_records} cached rows are fewer than one batch of {batch_size}: lower batch_size, or "
                    "give the split more examples")
  epochs = num_epochs if num_epochs is not None else sys.maxsize // (order.steps_per_epoch * local_batch)
  return (grain.MapDataset.range(epochs * order.steps_per_epoch * local_batch)
          .map(order).map(_Rows(arrays)).batch(local_batch).to_iter_dataset())


def make_eval_loader(dataset, split: str, *, batch_size: int, **kwargs) -> grain.IterDataset:
  """`make_loader` for scoring: every example of `split` exactly once, in order, eval
  transforms, the last batch padded with rows marked valid=False."""
  return make_loader(dataset, split, batch_size=batch_size, train=False, num_epochs=1,
                     drop_remainder=False, **kwargs)


def global_batch(local_batch: dict, sharding) -> dict:
  """Assemble each process's local batch into global jax.Arrays sharded on the batch axis.

  sharding: a jax.sharding.Sharding for the batch, or a Mesh (the batch axis is then split
  over all mesh axes). Every process must call this with the rows its devices hold
  (`parallel.process_rows`: what `make_loader(..., sharding=)` yields).
  """
  if isinstance(sharding, jax.sharding.Mesh):
    sharding = jax.sharding.NamedSharding(sharding, jax.sharding.PartitionSpec(sharding.axis_names))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
