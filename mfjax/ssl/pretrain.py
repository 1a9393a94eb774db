"""`mfjax pretrain`: MedDINOv3 domain-adaptive pretraining on CT slices. Read top to bottom.

workdir/
  config.json     the resolved config (a restart with a different one is refused)
  metrics.jsonl   every loss term, the schedules and the gradient norm, per logged step
  events.*        TensorBoard events
  checkpoints/    the latest state (student, EMA teacher, Gram teacher, optimizer, step), for resuming
  backbone/       the final EMA teacher's backbone as a converted model: `mfjax.models.load(workdir/backbone)`
  backbones/      step_N/: the same every `export_every_steps` (a later stage's Gram teacher)
  result.json     steps, final losses, timing

Data: every *.nii.gz / *.nii volume of `data.folders` is a source of axial slices. Each step draws
`batch_size` slices from a rotating pool of volumes held in memory, and cuts each into 2 global and
`n_local` local crops (`augment.multi_crop`); half the global crops get iBOT block masks
(`masking.collate_masks`). With `data.mixed_sizes` (the high-resolution stage) each step draws its
crop sizes from a weighted list, and each size set compiles its own step. All of it is a function
of (seed, step), so a resumed run sees the batches an uninterrupted one would have.

Stages (DINOv3's, run as separate runs): Stage 1 from random or converted weights; Stage 2 and 3
start from an earlier run's EMA teacher, heads included (`model.init_from_run`), with Gram
anchoring against an exported backbone (`gram.checkpoint`), refreshed from the EMA teacher every
`gram.refresh_every` steps (DINOv3's rep_update).

One step (one `jax.jit`, state donated):
  teacher (EMA, no drop path) on the unmasked global crops -> DINO head on CLS, iBOT head on the
      masked patches -> Sinkhorn-Knopp targets at the scheduled teacher temperature;
  student (drop path) on the masked global crops and on the local crops ->
      L = L_DINO + ibot_weight L_iBOT + koleo_weight * sum over the 2 global crops of KoLeo(CLS)
          (+ w_gram L_Gram against the frozen Gram teacher, from gram.teacher_step on), the DINO
          local term weighted by w_local; KoLeo over groups of loss.koleo_group_size if set;
  gradients clipped per module (backbone, DINO head, iBOT head) as DINOv2's trainer does, Adam, then
  p -= lr * multiplier * (adam + wd * p) with DINOv2's layer-wise LR decay, patch-embed multiplier,
  no decay on biases / norms / LayerScale / tokens, and the heads' last layers frozen at first;
  teacher = m * teacher + (1 - m) * student over backbone and both heads.
Schedules (DINOv2's CosineScheduler, per iteration, host side): LR linear warmup then cosine,
weight decay cosine, teacher momentum cosine, teacher temperature linear warmup; w_local and w_gram
constant or DINOv3's linear_warmup_cosine_decay (`*_weight_schedule`).

Devices: the state is replicated and the crops of a batch are split over every device of every
process (batch_size must divide by the device count); every process draws the whole batch (it is
a function of (seed, step)) and supplies its devices' shares. Under jit the losses' sums are
global, so Sinkhorn-Knopp and KoLeo see the whole batch, as on one device. iBOT masks are collated
per device (DINOv3: per GPU; `masking.group_crops` fixes the group instead), and each device gathers
and heads its own masked patches.
A SIGTERM (preemption) saves a checkpoint after the current step and exits; rerunning resumes.
"""
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from mfjax import models, parallel
from mfjax.config import ConfigError
from mfjax.data import volumes
from mfjax.ssl import augment, losses, masking
from mfjax.ssl.heads import DINOHead
from mfjax.train import build, fit, optim
from mfjax.train.checkpoints import RunCheckpoints
from mfjax.train.optim import clip_by_global_norm, decay_mask

log = logging.getLogger("mfjax")

HEADS = ("dino_head", "ibot_head")
TOKENS = ("cls_token", "storage_tokens", "mask_token")

# ------------------------------------------------------------------------------- data


def list_volumes(folders) -> list[str]:
  """The *.nii.gz / *.nii files of one folder, several comma-separated folders, or a list of them."""
  if isinstance(folders, str):
    folders = [f.strip() for f in folders.split(",")]
  folders = [os.path.expanduser(str(f)) for f in folders if str(f).strip()]
  if not folders:
    raise ConfigError("data.folders is empty: point it at a folder of *.nii.gz / *.nii CT volumes")
  paths, seen = [], {}
  for folder in folders:
    if not os.path.isdir(folder):
      raise ConfigError(f"data.folders: {folder} is not a folder")
    real = os.path.realpath(folder)
    if real in seen:
      raise ConfigError(f"data.folders names one folder twice ({seen[real]} and {folder}): its volumes would count "
                        "twice")
    seen[real] = folder
    if os.path.basename(os.path.normpath(folder)).startswith("labels"):
      log.warning("data.folders: %s looks like nnU-Net's label maps (labelsTr); pretraining wants the images "
                  "(imagesTr)", folder)
    found = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.endswith(volumes.NIFTI_ENDINGS))
    if not found:
      raise ConfigError(f"data.folders: {folder} holds no *.nii.gz or *.nii volumes")
    paths += found
  return paths


def check_volumes(paths: list[str], progress: bool = True) -> str:
  """Every volume's header checked before the run starts (a bad file fails now, not hours in, when
  it enters the pool), and a fingerprint of the list of file names: the data order is a function of
  it (folder and file names: the folders may move between machines)."""
  from tqdm.auto import tqdm
  for path in tqdm(paths, desc="checking volume headers", unit="volume", disable=not progress or len(paths) < 50):
    volumes.check_header(path)
  names = (os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p in paths)
  return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def check_same_volumes(paths: list[str], volume_list: str) -> None:
  """Every process of a job must list the same volumes (`volume_list`: check_volumes' fingerprint):
  each draws the whole batch from them. Raised on every process, naming each one's fingerprint."""
  listings = parallel.gathered(int(volume_list[:7], 16))
  if len(set(listings.tolist())) > 1:
    raise ConfigError(f"data.folders: the processes see different lists of volumes (this one {len(paths)}; "
                      f"fingerprints by process {listings.tolist()}); every process must see the same files (a "
                      "shared file system, or the same copy on each host)")


def axial_slices(path: str) -> np.ndarray:
  """(slices, rows, cols) HU in radiological view: anterior at the top, the patient's right on the left."""
  volume, _ = volumes.read_volume(path)
  return np.ascontiguousarray(np.transpose(volume[::-1, ::-1, :], (2, 1, 0)))


class SlicePool:
  """Axial slices of a rotating pool of volumes, as a function of (seed, step).

  The volumes are visited in a seeded shuffled order, pass after pass. At step t the pool holds the
  `size` volumes from position t * new_per_step of that stream, so a step reads only the volumes
  that entered the pool since the previous one, and any step can be reproduced on its own.
  A volume whose header passed `check_volumes` but whose voxels cannot be read (a truncated
  download) is left out of every pool it enters, with a warning, and listed in `unreadable`: the
  run goes on, and a resume with the same files leaves it out at the same steps. In a multi-process
  job every process draws the same slices: `check_pools_agree` stops them all if one could read a
  volume that another could not.
  """

  def __init__(self, paths: list[str], seed: int, size: int, new_per_step: int):
    self.paths, self.seed, self.new_per_step = paths, seed, new_per_step
    self.size = min(size, len(paths))
    self.loaded: dict[int, np.ndarray | None] = {}
    self.unreadable: dict[str, str] = {}  # path -> why

  def _read(self, i: int) -> np.ndarray | None:
    path = self.paths[i]
    if path in self.unreadable:
      return None
    try:
      return axial_slices(path)
    except volumes.VolumeError as e:
      self.unreadable[path] = str(e)
      log.warning("%s: left out of the slice pool for the rest of the run (listed in result.json's "
                  "unreadable_volumes)", e)
      return None

  def unreadable_digest(self) -> int:
    """A number that two pools with the same unreadable volumes share."""
    return int(hashlib.sha256("\n".join(sorted(self.unreadable)).encode()).hexdigest()[:7], 16)

  def volume_ids(self, step: int) -> list[int]:
    n = len(self.paths)
    if self.size == n:
      return list(range(n))
    positions = range(step * self.new_per_step, step * self.new_per_step + self.size)
    return [int(np.random.default_rng([self.seed, 1, p // n]).permutation(n)[p % n]) for p in positions]

  def sample(self, step: int, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """`n` slices drawn uniformly from all slices of the step's pool."""
    ids = self.volume_ids(step)
    self.loaded = {i: self.loaded[i] if i in self.loaded else self._read(i) for i in ids}
    stacks = [self.loaded[i] for i in ids if self.loaded[i] is not None]
    if not stacks:
      raise volumes.VolumeError(f"step {step}: no volume of its pool can be read: " + "; ".join(
          self.unreadable[self.paths[i]] for i in ids))
    ends = np.cumsum([len(s) for s in stacks])
    picks = rng.integers(0, ends[-1], n)
    which = np.searchsorted(ends, picks, side="right")
    return [stacks[v][p - (ends[v] - len(stacks[v]))] for v, p in zip(which, picks)]


def correlated_batches(batch_size: int, pool_size: int) -> str:
  """A warning when a batch takes more than 8 slices per pool volume; "" otherwise."""
  if batch_size <= 8 * pool_size:
    return ""
  return (f"each step draws {batch_size} slices from a pool of {pool_size} volumes ({batch_size / pool_size:.0f} per "
          "volume, many of them neighbours): batches are far more correlated than DINOv3's draws over the whole "
          "dataset. Raise data.pool_volumes as memory allows")


def gram_on(config) -> bool:
  return config.gram.weight > 0 or config.gram.weight_schedule.enabled


def size_sets(config) -> list[tuple[int, int, int]]:
  """The (global, local, Gram-teacher) crop sizes a step may use; Gram size 0 = the global crops."""
  d = config.data
  if not d.mixed_sizes:
    return [(d.global_size, d.local_size, config.gram.crop_size if gram_on(config) else 0)]
  return [(int(g), int(l), int(gram)) for g, l, gram, _ in d.mixed_sizes]


def step_sizes(config, step: int) -> tuple[int, int, int]:
  """The crop sizes of `step`: with data.mixed_sizes, a seeded draw weighted by the shares
  (DINOv3's multi-resolution loader picks one loader per batch by its ratio)."""
  sets = size_sets(config)
  if len(sets) == 1:
    return sets[0]
  shares = np.array([float(entry[3]) for entry in config.data.mixed_sizes])
  return sets[int(np.random.default_rng([config.seed, 4, step]).choice(len(sets), p=shares / shares.sum()))]


def check_pools_agree(pool: SlicePool, step: int, every: int) -> None:
  """Every `every` steps of a multi-process job (with the preemption check, which waits for the
  device already): a volume one process read and another could not (a damaged copy on one host)
  stops every process, naming what this one could not read, instead of each drawing other slices."""
  if jax.process_count() == 1 or step % every:
    return
  digests = parallel.gathered(pool.unreadable_digest())
  if len(set(digests.tolist())) > 1:
    raise volumes.VolumeError(
        f"step {step}: the processes could not read the same volumes (this one: {sorted(pool.unreadable) or 'none'}); "
        "every host must see the same, readable files. Replace the damaged copy; the run resumes from its last "
        "checkpoint")


def make_batch(config, pool: SlicePool, step: int, networks: "Networks", executor) -> dict[str, np.ndarray]:
  """Crop-major multi-crop batch at the step's sizes: global (2B, G, G, 3), local (n_local B, L, L, 3)
  [, gram (2B, S, S, 3)], masks (2B, N) and the masked-patch gather arrays."""
  b, d = config.batch_size, config.data
  global_size, local_size, gram_size = step_sizes(config, step)
  slices = pool.sample(step, np.random.default_rng([config.seed, 0, step]), b)

  def crops(i):
    rng = np.random.default_rng([config.seed, 2, step, i])
    return augment.multi_crop(slices[i], rng, global_size, local_size, d.n_local, tuple(d.global_scale),
                              tuple(d.local_scale), gram_size, config.gram.distortions, d.horizontal_flips)

  per_slice = list(executor.map(crops, range(b)) if executor else map(crops, range(b)))
  crop_major = lambda kind: np.stack([c[kind][k] for k in range(len(per_slice[0][kind])) for c in per_slice])
  m, groups = config.masking, networks.mask_groups
  grid = networks.student.token_grid((global_size,) * 2)
  masks = [masking.collate_masks(np.random.default_rng([config.seed, 3, step] + ([j] if groups > 1 else [])),
                                 2 * b // groups, grid, m.probability, tuple(m.ratio), m.min_patches, m.min_aspect,
                                 m.max_fraction) for j in range(groups)]
  return {"global": crop_major("global"), "local": crop_major("local"),
          "masks": np.concatenate([g["masks"] for g in masks]),
          "mask_indices": np.stack([g["indices"] for g in masks]),
          "mask_weights": np.stack([g["weights"] for g in masks]),
          **({"gram": crop_major("gram")} if "gram" in per_slice[0] else {})}


def mask_groups(config, devices: int) -> int:
  """How many groups the global crops' iBOT masks are collated in: one per device unless
  `masking.group_crops` says otherwise. DINOv3 collates each GPU's crops; here it also keeps each
  device's masked patches (and their (M, prototypes) head outputs) on that device."""
  crops, group = 2 * config.batch_size, config.masking.group_crops or 2 * config.batch_size // devices
  if group < 1 or crops % group:
    raise ConfigError(f"masking.group_crops={config.masking.group_crops} must divide the {crops} global crops "
                      f"(2 x batch_size={config.batch_size})")
  return crops // group


# ------------------------------------------------------------------------------- schedules


def cosine_schedule(step: int, base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0,
                    freeze: int = 0) -> float:
  """DINOv2's CosineScheduler[step]: `freeze` zeros, then linspace(warmup_start, base, warmup) (both
  ends included), then a cosine from base to final over the remaining steps; `final` from `total` on."""
  if step >= total:
    return final
  if step < freeze:
    return 0.0
  step -= freeze
  if step < warmup:
    return warmup_start + (base - warmup_start) * step / (warmup - 1) if warmup > 1 else warmup_start
  step -= warmup
  return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / (total - warmup - freeze)))


def warmup_cosine(step: int, start: float, peak: float, end: float, warmup: int, total: int,
                  cosine: int = -1) -> float:
  """DINOv3's linear_warmup_cosine_decay(...)[step]: linspace(start, peak, warmup) without its end,
  then a cosine from peak to end over `cosine` steps (-1: the rest; both ends included), then end."""
  if step < warmup:
    return start + (peak - start) * step / warmup
  step -= warmup
  cosine = total - warmup if cosine < 0 else cosine
  if step < cosine:
    return end + (peak - end) * (1 + math.cos(math.pi * step / (cosine - 1) if cosine > 1 else 0.0)) / 2
  return end


# The scheduled loss weights: config[part][key] is the constant, config[part][key + "_schedule"] the schedule.
WEIGHT_SCHEDULES = {"local_weight": ("loss", "local_weight"), "gram_weight": ("gram", "weight")}


def loss_weight(config, name: str, step: int) -> float:
  """A loss weight at `step`: its constant, or its schedule when that is enabled."""
  part, key = WEIGHT_SCHEDULES[name]
  constant, schedule = config[part][key], config[part][key + "_schedule"]
  if not schedule.enabled:
    return float(constant)
  length = config.epoch_length
  cosine = schedule.cosine_epochs * length if schedule.cosine_epochs >= 0 else -1
  return warmup_cosine(step, schedule.start, schedule.peak, schedule.end, schedule.warmup_epochs * length,
                       config.epochs * length, cosine)


def schedules(config, step: int) -> dict[str, float]:
  length, o, t = config.epoch_length, config.optim, config.teacher
  total = config.epochs * length
  lr = cosine_schedule(step, o.base_lr * math.sqrt(config.batch_size / 1024), o.min_lr, total,
                       warmup=o.warmup_epochs * length)
  temp_warmup = t.temp_warmup_epochs * length
  return {"lr": lr,
          "last_layer_lr": 0.0 if step < o.freeze_last_layer_epochs * length else lr,
          "wd": cosine_schedule(step, o.weight_decay, o.final_weight_decay, total),
          "momentum": cosine_schedule(step, t.momentum, t.final_momentum, total),
          "teacher_temp": cosine_schedule(step, t.temp, t.temp, temp_warmup, temp_warmup, t.warmup_temp),
          "local_weight": loss_weight(config, "local_weight", step),
          **({"gram_weight": loss_weight(config, "gram_weight", step)} if gram_on(config) else {})}


def gram_refresh_due(config, step: int) -> bool:
  """Whether the EMA teacher replaces the Gram teacher before `step` (after step - 1): DINOv3's
  rep_update at every multiple of gram.refresh_every from gram.first_refresh on, at most
  gram.max_refreshes times. A function of the step, so a resumed run refreshes where an
  uninterrupted one did."""
  g = config.gram
  if not (gram_on(config) and g.refresh_every) or step <= 0 or step < g.first_refresh or step % g.refresh_every:
    return False
  earlier = (step - 1) // g.refresh_every - (max(g.first_refresh, 1) - 1) // g.refresh_every
  return not g.max_refreshes or earlier < g.max_refreshes


# ------------------------------------------------------------------------------- model and state


@dataclasses.dataclass(frozen=True)
class Networks:
  """The modules and constants of a train step; hashable, so one compiled step serves every run."""
  student: nn.Module
  teacher: nn.Module
  gram_teacher: nn.Module
  dino_head: nn.Module
  ibot_head: nn.Module
  batch_size: int
  n_local: int
  student_grid: tuple[int, int]
  gram_grid: tuple[int, int]
  student_temp: float
  ibot_weight: float
  koleo_weight: float
  koleo_group_size: int
  sinkhorn_iterations: int
  gram_img_level: bool
  clip_norm: float
  b1: float
  b2: float
  eps: float
  mask_groups: int = 1     # iBOT masks are collated per group of 2 * batch_size / mask_groups global crops
  batch_shards: int = 1    # devices the crops are split over: Gram over the batch (img_level=False) is per shard


def architecture(config) -> tuple[str, dict]:
  """(model name, constructor overrides) of the backbone: the config's, over the checkpoint's."""
  name, overrides = config.model.name, dict(config.model.overrides)
  if models.family_of(name) != "dinov3":
    raise ConfigError(f"model.name={name!r}: pretraining needs a DINOv3-family backbone; valid: "
                      f"{', '.join(n for n in models.NAMES if models.family_of(n) == 'dinov3')}")
  if config.model.checkpoint:
    meta = models.read_model_json(config.model.checkpoint)
    if meta["name"] != name:
      raise ConfigError(f"model.checkpoint {config.model.checkpoint} holds a {meta['name']}, not model.name={name}")
    overrides = {**meta["overrides"], **overrides}
  return name, overrides


def check_config(config, resuming: bool = False) -> None:
  """The config's pretraining-specific rules, each broken one an error naming its key. `resuming`: a run
  that saved a checkpoint under this config goes on with a warning where a rule was added since."""
  optim.check_optim(config.optim)
  build.check_dtype(config)
  group = config.loss.koleo_group_size
  if config.batch_size < 2 or config.data.n_local < 1:
    raise ConfigError(f"batch_size={config.batch_size}, data.n_local={config.data.n_local}: KoLeo needs a batch "
                      "of at least 2 and the DINO loss at least one local crop")
  if group and (group < 2 or config.batch_size % group):
    raise ConfigError(f"loss.koleo_group_size={group}: a KoLeo group needs at least 2 images and must divide "
                      f"batch_size={config.batch_size}")
  g = config.gram
  if not gram_on(config) and (g.checkpoint or g.crop_size or g.refresh_every):
    raise ConfigError("gram.checkpoint, gram.crop_size and gram.refresh_every need Gram anchoring on "
                      "(gram.weight > 0 or gram.weight_schedule.enabled)")
  if min(g.refresh_every, g.first_refresh, g.max_refreshes) < 0:
    raise ConfigError("gram.refresh_every, gram.first_refresh and gram.max_refreshes must be >= 0")
  if not g.refresh_every and (g.first_refresh or g.max_refreshes):
    raise ConfigError(f"gram.first_refresh={g.first_refresh} / gram.max_refreshes={g.max_refreshes} shape the "
                      "refreshes of gram.refresh_every, which is 0 (none): set it, or leave them 0")
  gram_crops = g.crop_size or any(tuple(entry)[2:3] != (0,) for entry in config.data.mixed_sizes)
  if not g.distortions and not gram_crops:
    raise ConfigError("gram.distortions=False acts on the Gram teacher's own crops, and there are none (gram.crop_size"
                      "=0, no Gram size in data.mixed_sizes): the Gram teacher would see the student's distorted "
                      "crops anyway. Set gram.crop_size, or leave gram.distortions=True")
  for part, key in WEIGHT_SCHEDULES.values():
    schedule = config[part][key + "_schedule"]
    if schedule.enabled and (schedule.warmup_epochs < 0 or schedule.warmup_epochs + max(schedule.cosine_epochs, 0)
                             > config.epochs):
      raise ConfigError(f"{part}.{key}_schedule: warmup_epochs={schedule.warmup_epochs} + "
                        f"cosine_epochs={schedule.cosine_epochs} must fit in epochs={config.epochs}")
  o, t = config.optim, config.teacher
  longer = [f"{key}={value}" for key, value in (("optim.warmup_epochs", o.warmup_epochs),
                                                  ("optim.freeze_last_layer_epochs", o.freeze_last_layer_epochs))
            if value > config.epochs]
  if t.temp_warmup_epochs > config.epochs and t.warmup_temp != t.temp:
    longer.append(f"teacher.temp_warmup_epochs={t.temp_warmup_epochs} (teacher.warmup_temp={t.warmup_temp} never "
                  f"reaches teacher.temp={t.temp})")
  if longer:
    problem = (f"{', '.join(longer)}: longer than the run's epochs={config.epochs}; every schedule starts afresh "
               "in each run (a later stage too)")
    if not resuming:
      raise ConfigError(problem + ", so shorten it")
    log.warning("%s; resuming the run as it was started", problem)
  if config.model.init_from_run and config.model.checkpoint:
    raise ConfigError("model.init_from_run and model.checkpoint both name a starting point; set one")
  if config.data.mixed_sizes and g.crop_size:
    raise ConfigError(f"gram.crop_size={g.crop_size} and data.mixed_sizes both set the Gram crop size; with "
                      "mixed sizes, give it in each (global, local, gram, share) entry")
  for i, entry in enumerate(config.data.mixed_sizes):
    entry = tuple(entry)
    if len(entry) != 4 or min(entry[0], entry[1], entry[3]) <= 0 or entry[2] < 0:
      raise ConfigError(f"data.mixed_sizes[{i}]={entry}: give (global, local, gram, share) with positive sizes "
                        "and share (gram 0 = the global crops)")
    if entry[2] and not gram_on(config):
      raise ConfigError(f"data.mixed_sizes[{i}]={entry} has a Gram crop size but Gram anchoring is off")


def build_networks(config, resuming: bool = False) -> tuple[Networks, dict | None]:
  """The step's Networks (at the first crop sizes; `at_sizes` gives the others), and the Gram
  teacher's loaded variables when gram.checkpoint names one."""
  check_config(config, resuming)
  build.use_matmul_precision(config)
  name, overrides = architecture(config)
  student = models.create(name, **overrides, dtype=config.model.dtype, drop_path=config.model.drop_path)
  teacher = models.create(name, **overrides, dtype=config.model.dtype, drop_path=0.0)
  gram_teacher, gram_variables = teacher, None
  if gram_on(config) and config.gram.checkpoint:
    if models.family_of(models.read_model_json(config.gram.checkpoint)["name"]) != "dinov3":
      raise ConfigError(f"gram.checkpoint {config.gram.checkpoint} is not a DINOv3-family model")
    gram_teacher, gram_variables = models.load(config.gram.checkpoint)
    gram_teacher = gram_teacher.clone(dtype=config.model.dtype, drop_path=0.0)
  h = config.heads
  networks = Networks(
      student, teacher, gram_teacher, DINOHead(h.dino_prototypes, h.hidden_dim, h.bottleneck_dim),
      DINOHead(h.ibot_prototypes, h.hidden_dim, h.bottleneck_dim), config.batch_size, config.data.n_local,
      (0, 0), (0, 0), config.loss.student_temp, config.loss.ibot_weight, config.loss.koleo_weight,
      config.loss.koleo_group_size, config.loss.sinkhorn_iterations, config.gram.img_level, config.optim.clip_norm,
      config.optim.b1, config.optim.b2, config.optim.eps)
  return at_sizes(networks, size_sets(config)[0]), gram_variables


def at_sizes(networks: Networks, sizes: tuple[int, int, int]) -> Networks:
  """`networks` for (global, local, Gram) crop sizes: a step compiles once per size set."""
  global_size, _, gram_size = sizes
  return dataclasses.replace(networks, student_grid=networks.student.token_grid((global_size,) * 2),
                             gram_grid=networks.gram_teacher.token_grid(((gram_size or global_size),) * 2))


def adam(networks: Networks) -> optax.GradientTransformation:
  return optax.scale_by_adam(b1=networks.b1, b2=networks.b2, eps=networks.eps)


def parameter_plan(params: dict, depth: int, layer_decay: float, patch_embed_mult: float) -> dict:
  """Per-parameter constants of the update, as DINOv2's `get_params_groups_with_decay`:
  lr_scale  layer_decay ** (depth + 1 - layer): patch embedding and tokens are layer 0, block i is
            layer i + 1, the final norm and the heads depth + 1; the patch embedding also x patch_embed_mult
  decay     1 where weight decay applies: not biases, norms or LayerScale gammas (DINOv3's rule is by name,
            so the cls, storage and mask tokens are decayed)
  last      1 for the heads' last layers (their own, frozen-at-first learning rate)"""
  names = lambda path: [getattr(p, "key", str(p)) for p in path]

  def lr_scale(path, _):
    module, part = names(path)[:2]
    layer = depth + 1
    if module == "backbone" and (part == "patch_embed" or part in TOKENS):
      layer = 0
    elif module == "backbone" and part.startswith("blocks_"):
      layer = int(part.split("_")[1]) + 1
    return layer_decay ** (depth + 1 - layer) * (patch_embed_mult if part == "patch_embed" else 1.0)

  decays = decay_mask(params)
  return {"lr_scale": jax.tree_util.tree_map_with_path(lr_scale, params),
          "decay": jax.tree_util.tree_map_with_path(lambda p, d: float(d or names(p)[1] in TOKENS), decays),
          "last": jax.tree_util.tree_map_with_path(lambda p, _: float("last_layer" in names(p)), params)}


def teacher_of_run(config, sharding) -> dict:
  """The EMA teacher (backbone and both heads) of the latest checkpoint of the pretrain run at
  model.init_from_run, which must have this run's architecture and heads."""
  source, source_config = fit.read_run_config(config.model.init_from_run)
  key = "model.init_from_run"
  if "masking" not in source_config or "heads" not in source_config:
    raise ConfigError(f"{key}: {source} is not an `mfjax pretrain` run")
  ours = {"model": architecture(config), "heads": config.heads.to_dict()}
  theirs = {"model": architecture(source_config), "heads": source_config.heads.to_dict()}
  differ = [f"{k}: {ours[k]} here, {theirs[k]} there" for k in ours if json.dumps(ours[k], sort_keys=True, default=str)
            != json.dumps(theirs[k], sort_keys=True, default=str)]
  if differ:
    raise ConfigError(f"{key}: {source} trained another network; " + "; ".join(differ))
  found = RunCheckpoints(source).restore_latest_as_saved(sharding)
  if found is None:
    raise ConfigError(f"{key}: {source} has no checkpoint yet")
  step, saved = found
  log.info("student and teacher start as the EMA teacher of %s at its step %d", source, step)
  return saved["teacher"]


def initial_state(config, networks: Networks, gram_variables, start: dict | None = None) -> dict:
  """The step-0 state; `start` (backbone and both heads, from `teacher_of_run`) replaces the
  random student and teacher."""
  init_rng, dino_rng, ibot_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  backbone = models.init_params(networks.student, init_rng, (config.data.global_size,) * 2)["params"]
  if config.model.checkpoint:
    backbone = build.with_checkpoint(backbone, config.model.checkpoint, (), "backbone")
  features = jnp.zeros((1, networks.student.width), jnp.float32)
  student = {"backbone": backbone,
             "dino_head": networks.dino_head.init(dino_rng, features)["params"],
             "ibot_head": networks.ibot_head.init(ibot_rng, features)["params"]}
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)  # structure and shapes
  if start is not None:
    if shapes(start) != shapes(student):
      raise ConfigError(f"model.init_from_run: {config.model.init_from_run}'s teacher does not have this run's "
                        "parameter shapes")
    student = start
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
  state = {"step": jnp.zeros((), jnp.int32), "rng": train_rng, "student": copy(student), "teacher": copy(student),
           "opt": adam(networks).init(student)}
  if gram_on(config):
    state["gram"] = copy(gram_variables["params"] if gram_variables else student["backbone"])
    if config.gram.refresh_every and shapes(state["gram"]) != shapes(student["backbone"]):
      raise ConfigError(f"gram.refresh_every: the EMA teacher cannot replace the Gram teacher of gram.checkpoint "
                        f"{config.gram.checkpoint}, whose architecture differs from the student's")
  return state


# ------------------------------------------------------------------------------- the step


def masked_patches(tokens, indices):
  """(groups * M, D) masked-patch tokens of crop-major (crops, N, D) tokens; `indices` (groups, M)
  index each group's flattened (crops / groups * N) tokens, so a device gathers from its own crops."""
  groups = indices.shape[0]
  grouped = tokens.reshape(groups, -1, tokens.shape[-1])
  return jnp.take_along_axis(grouped, indices[..., None], axis=1).reshape(-1, tokens.shape[-1])


def train_step(state, batch, sched, plan, networks: Networks, use_gram: bool, state_sharding):
  n = networks
  b, n_global = n.batch_size, 2
  global_rng, local_rng = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
  head = lambda module, params, x: module.apply({"params": params}, x)
  masked = lambda tokens: masked_patches(tokens, batch["mask_indices"])

  teacher = state["teacher"]
  t_out = n.teacher.apply({"params": teacher["backbone"]}, batch["global"], train=False)
  dino_targets = losses.sinkhorn_knopp(head(n.dino_head, teacher["dino_head"], t_out["pooled"]),
                                       sched["teacher_temp"], n.sinkhorn_iterations).reshape(n_global, b, -1)
  ibot_targets = losses.sinkhorn_knopp(head(n.ibot_head, teacher["ibot_head"], masked(t_out["tokens"])),
                                       sched["teacher_temp"], n.sinkhorn_iterations)
  if use_gram:
    gram_images = batch["gram"] if "gram" in batch else batch["global"]
    gram_tokens = n.gram_teacher.apply({"params": state["gram"]}, gram_images, train=False)["tokens"]

  def loss_of(params):
    g = n.student.apply({"params": params["backbone"]}, batch["global"], train=True, masks=batch["masks"],
                        rngs={"dropout": global_rng})
    l = n.student.apply({"params": params["backbone"]}, batch["local"], train=True, rngs={"dropout": local_rng})
    terms = losses.dino_cls_loss(head(n.dino_head, params["dino_head"], g["pooled"]).reshape(n_global, b, -1),
                                 head(n.dino_head, params["dino_head"], l["pooled"]).reshape(n.n_local, b, -1),
                                 dino_targets, sched["local_weight"], n.student_temp)
    terms["ibot"] = losses.ibot_loss(head(n.ibot_head, params["ibot_head"], masked(g["tokens"])), ibot_targets,
                                     batch["mask_weights"].reshape(-1), n_global * b, n.student_temp)
    cls = g["pooled"].reshape(n_global, b, -1)
    terms["koleo"] = sum(losses.koleo_loss(cls[i], group_size=n.koleo_group_size) for i in range(n_global)) / n_global
    total = terms["dino"] + n.ibot_weight * terms["ibot"] + n.koleo_weight * n_global * terms["koleo"]
    if use_gram:
      terms["gram"] = losses.gram_loss(g["tokens"], gram_tokens, n.student_grid, n.gram_grid, n.gram_img_level,
                                       groups=n.batch_shards)
      total = total + sched["gram_weight"] * terms["gram"]
    return total, dict(terms, loss=total)

  grads, terms = jax.grad(loss_of, has_aux=True)(state["student"])
  grad_norm = optax.tree.norm(grads)
  if n.clip_norm:
    clip = clip_by_global_norm(n.clip_norm)
    grads = {k: clip.update(v, optax.EmptyState())[0] for k, v in grads.items()}
  updates, opt = adam(n).update(grads, state["opt"])

  def update(p, u, lr_scale, decay, last):
    lr = jnp.where(last > 0, sched["last_layer_lr"], sched["lr"]) * lr_scale
    return p - lr * (u + sched["wd"] * decay * p)

  student = jax.tree_util.tree_map(update, state["student"], updates, plan["lr_scale"], plan["decay"], plan["last"])
  m = sched["momentum"]
  teacher = jax.tree_util.tree_map(lambda t, s: m * t + (1 - m) * s, teacher, student)
  new = dict(state, step=state["step"] + 1, student=student, teacher=teacher, opt=opt)
  return jax.lax.with_sharding_constraint(new, state_sharding), dict(terms, grad_norm=grad_norm)


jitted_train_step = jax.jit(train_step, static_argnames=("networks", "use_gram", "state_sharding"),
                            donate_argnames=("state",))


def place_batch(batch: dict, mesh) -> dict:
  """Crops, masks and the masked-patch arrays (per mask group) split over the mesh along their first
  axis; the masked-patch arrays replicated when their groups do not divide over the devices."""
  split, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  groups = batch["mask_indices"].shape[0]
  return {k: parallel.put_global(v, whole if k.startswith("mask_") and groups % mesh.devices.size else split)
          for k, v in batch.items()}


# ------------------------------------------------------------------------------- the run


@fit.holds_workdir
def run(config, workdir, progress: bool = True) -> dict:
  """Pretrain as `config` says, resuming from workdir's checkpoint; returns (and writes) result.json."""
  start_time = time.time()
  paths = list_volumes(config.data.folders)
  resuming = fit.has_saved_work(workdir)
  check_config(config, resuming)
  volume_list = check_volumes(paths, progress)
  architecture(config)  # config errors before the workdir (and its config.json) is written
  # multi-host initialisation: before any JAX call. A step's crops are drawn by (seed, step, slice), whatever the
  # number of threads that cut them.
  workdir, config_dict = fit.start_run(config, workdir, changeable=("data.num_workers", "log_every_steps"))
  check_same_volumes(paths, volume_list)
  networks, gram_variables = build_networks(config, resuming)  # loads gram.checkpoint (JAX)
  mesh = parallel.make_mesh()
  if config.batch_size % mesh.devices.size:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {mesh.devices.size} devices")
  networks = dataclasses.replace(networks, mask_groups=mask_groups(config, mesh.devices.size),
                                 batch_shards=int(mesh.devices.size))
  replicated = parallel.replicated(mesh)
  result_path, backbone_dir = workdir / "result.json", workdir / "backbone"
  if result_path.exists() and backbone_dir.exists():
    log.info("%s has finished already: %s", workdir, backbone_dir)
    return json.loads(result_path.read_text())

  ckpts = RunCheckpoints(workdir, owner=True)  # holds the lock
  start = None
  if config.model.init_from_run and ckpts.latest.latest_step() is None:
    start = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), teacher_of_run(config, replicated))
  state = parallel.put_global(initial_state(config, networks, gram_variables, start), replicated)
  plan = parallel.put_global(jax.tree_util.tree_map(np.float32, parameter_plan(
      state["student"], networks.student.depth, config.optim.layer_decay, config.optim.patch_embed_lr_mult)),
      replicated)
  host = {"train_seconds": 0.0, "volumes": volume_list, "num_volumes": len(paths)}
  restored = ckpts.restore_latest(fit.abstract_of(state))
  if restored is not None:
    state, host = restored
    if host.get("volumes", volume_list) != volume_list:  # checkpoints before the list was recorded: no check
      raise ConfigError(f"data.folders now hold another list of volumes ({len(paths)}) than the list of "
                        f"{host.get('num_volumes')} the run in {workdir} started with: the slices it draws at each "
                        "step would change. Restore that list, or start a new --workdir")
    host.setdefault("volumes", volume_list)
    host.setdefault("num_volumes", len(paths))
  step, total_steps = int(state["step"]), config.epochs * config.epoch_length
  if restored is not None:
    log.info("resumed %s at step %d", workdir, step)
  writer = fit.Writer(workdir, step)
  pool = SlicePool(paths, config.seed, config.data.pool_volumes, config.data.new_volumes_per_step)
  warning = correlated_batches(config.batch_size, pool.size)
  if warning:
    log.warning(warning)
  executor = concurrent.futures.ThreadPoolExecutor(config.data.num_workers) if config.data.num_workers else None
  log.info("pretraining %s on %d volumes: %d steps of %d slices", config.model.name, len(paths), total_steps,
           config.batch_size)
  networks_of = {sizes: at_sizes(networks, sizes) for sizes in size_sets(config)}
  if len(networks_of) > 1:
    log.info("crop sizes (global, local, Gram) drawn per step from %s; each set compiles its own step",
             list(networks_of))

  preemption = parallel.Preemption().start()
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=f"pretrain {config.model.name}")
  segment_start = time.time()
  pending, last = None, {}  # the previous step's metrics, read one step late to keep the device busy
  try:
    while step < total_steps:
      refresh = gram_refresh_due(config, step)
      if gram_on(config) and (refresh or not config.gram.checkpoint and step == config.gram.teacher_step):
        if refresh:
          log.info("step %d: the EMA teacher replaces the Gram teacher", step)
        state["gram"] = jax.tree_util.tree_map(jnp.array, state["teacher"]["backbone"])
      step_networks = networks_of[step_sizes(config, step)]
      batch = place_batch(make_batch(config, pool, step, step_networks, executor), mesh)
      sched = schedules(config, step)
      use_gram = gram_on(config) and step >= config.gram.teacher_step
      state, metrics = jitted_train_step(state, batch, jax.tree_util.tree_map(jnp.float32, sched), plan,
                                         networks=step_networks, use_gram=use_gram, state_sharding=replicated)
      if pending is not None:
        last = _check_and_log(pending, writer, config)
      pending = (step, sched, metrics)
      step += 1
      preempted = preemption.due(step)  # decided by all processes together
      check_pools_agree(pool, step, preemption.every)
      if bar is not None:
        bar.update(1)
        if last:
          bar.set_postfix(loss=f"{last['train/loss']:.4f}", lr=f"{sched['lr']:.2e}")
      checkpoint_due = step % config.checkpoint_every_steps == 0 or step == total_steps
      export_due = bool(config.export_every_steps) and step % config.export_every_steps == 0 and step < total_steps
      if checkpoint_due or preempted or export_due:  # checked before anything is saved
        last = _check_and_log(pending, writer, config, force=checkpoint_due)  # a preemption logs on cadence only
        pending = None
      # An export comes before the checkpoint of its step: a run killed between the two redoes the step
      # and the export, instead of resuming past a step whose export never finished.
      if export_due:
        export_backbone(config, state, workdir / "backbones" / f"step_{step}", workdir, step)
      if checkpoint_due or preempted:
        host = {**host, "train_seconds": host["train_seconds"] + time.time() - segment_start,
                "unreadable_volumes": sorted({*host.get("unreadable_volumes", []), *pool.unreadable})}
        segment_start = time.time()
        writer.flush()  # first: a resume truncates lines past its checkpoint, but cannot restore missing ones
        ckpts.save_latest(step, state, host)
      if preempted:
        return preemption.stopped(step)
  finally:
    preemption.stop()
    if bar is not None:
      bar.close()
    if executor is not None:
      executor.shutdown()

  result = {"config": config_dict, "model": config.model.name, "steps": total_steps, "volumes": len(paths),
            "unreadable_volumes": sorted({*host.get("unreadable_volumes", []), *pool.unreadable}),
            "backbone": str(backbone_dir), "final": last, "train_seconds": host["train_seconds"],
            "wall_seconds": time.time() - start_time, "devices": int(mesh.devices.size),
            "device_kind": jax.devices()[0].device_kind}
  writer.close()
  ckpts.close()
  export_backbone(config, state, backbone_dir, workdir, total_steps)
  parallel.on_process_zero("write result.json", fit.write_atomically, result_path,
                           json.dumps(result, indent=2, sort_keys=True, default=float))
  return result


def export_backbone(config, state, out_dir: epath.Path, workdir, step: int) -> None:
  """The EMA teacher's backbone as a converted model at `out_dir`; an export that exists already (a
  resumed run passing the same step) is the same and is kept. Every process calls it (models.save)."""
  if (out_dir / models.MODEL_JSON).exists():
    return
  name, overrides = architecture(config)
  backbone = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), state["teacher"]["backbone"])
  models.save(str(out_dir), name, {"params": backbone}, overrides,
              provenance={"source": "mfjax pretrain", "workdir": str(workdir), "steps": step})


def _check_and_log(pending, writer, config, force: bool = False) -> dict:
  step, sched, metrics = pending
  values = {f"train/{k}": float(v) for k, v in metrics.items()}
  bad = {k: v for k, v in values.items() if not np.isfinite(v)}
  if bad:
    raise fit.NonFiniteError(f"step {step + 1}: {bad}; stopping. The last good checkpoint is kept in the workdir; "
                             "lower optim.base_lr or check the data.")
  values.update({f"train/{k}": v for k, v in sched.items()})
  if force or (step + 1) % config.log_every_steps == 0:
    writer.write(step + 1, values)
  return values
