"""`mfjax pretrain`: MedDINOv3 domain-adaptive pretraining on CT slices. Read top to bottom.

workdir/
  config.json     the resolved config (a restart with a different one is refused)
  metrics.jsonl   every loss term, the schedules and the gradient norm, per logged step
  events.*        TensorBoard events
  checkpoints/    the latest state (student, EMA teacher, Gram teacher, optimizer, step), for resuming
  backbone/       the final EMA teacher's backbone as a converted model: `mfjax.models.load(workdir/backbone)`
  result.json     steps, final losses, timing

Data: every *.nii.gz / *.nii volume of `data.folders` is a source of axial slices. Each step draws
`batch_size` slices from a rotating pool of volumes held in memory, and cuts each into 2 global and
`n_local` local crops (`augment.multi_crop`); half the global crops get iBOT block masks
(`masking.collate_masks`). All of it is a function of (seed, step), so a resumed run sees the
batches an uninterrupted one would have.

One step (one `jax.jit`, state donated):
  teacher (EMA, no drop path) on the unmasked global crops -> DINO head on CLS, iBOT head on the
      masked patches -> Sinkhorn-Knopp targets at the scheduled teacher temperature;
  student (drop path) on the masked global crops and on the local crops ->
      L = L_DINO + ibot_weight L_iBOT + koleo_weight * sum over the 2 global crops of KoLeo(CLS)
          (+ gram.weight L_Gram against the frozen Gram teacher, from gram.teacher_step on);
  gradients clipped per module (backbone, DINO head, iBOT head) as DINOv2's trainer does, Adam, then
  p -= lr * multiplier * (adam + wd * p) with DINOv2's layer-wise LR decay, patch-embed multiplier,
  no decay on biases / norms / LayerScale / tokens, and the heads' last layers frozen at first;
  teacher = m * teacher + (1 - m) * student over backbone and both heads.
Schedules (DINOv2's CosineScheduler, per iteration, host side): LR linear warmup then cosine,
weight decay cosine, teacher momentum cosine, teacher temperature linear warmup.

Devices: the state is replicated and the crops of a batch are split over every device of every
process (batch_size must divide by the device count); every process draws the whole batch (it is
a function of (seed, step)) and supplies its devices' shares. Under jit the losses' sums are
global, so Sinkhorn-Knopp and KoLeo see the whole batch, as on one device.
A SIGTERM (preemption) saves a checkpoint after the current step and exits; rerunning resumes.
"""
import concurrent.futures
import dataclasses
import glob
import json
import logging
import math
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mfjax import models, parallel
from mfjax.config import ConfigError
from mfjax.data import volumes
from mfjax.ssl import augment, losses, masking
from mfjax.ssl.heads import DINOHead
from mfjax.train import build, fit
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
  paths = []
  for folder in folders:
    if not os.path.isdir(folder):
      raise ConfigError(f"data.folders: {folder} is not a folder")
    found = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.endswith(volumes.NIFTI_ENDINGS))
    if not found:
      raise ConfigError(f"data.folders: {folder} holds no *.nii.gz or *.nii volumes")
    paths += found
  return paths


def axial_slices(path: str) -> np.ndarray:
  """(slices, rows, cols) HU in radiological view: anterior at the top, the patient's right on the left."""
  volume, _ = volumes.read_volume(path)
  return np.ascontiguousarray(np.transpose(volume[::-1, ::-1, :], (2, 1, 0)))


class SlicePool:
  """Axial slices of a rotating pool of volumes, as a function of (seed, step).

  The volumes are visited in a seeded shuffled order, pass after pass. At step t the pool holds the
  `size` volumes from position t * new_per_step of that stream, so a step reads only the volumes
  that entered the pool since the previous one, and any step can be reproduced on its own.
  """

  def __init__(self, paths: list[str], seed: int, size: int, new_per_step: int):
    self.paths, self.seed, self.new_per_step = paths, seed, new_per_step
    self.size = min(size, len(paths))
    self.loaded: dict[int, np.ndarray] = {}

  def volume_ids(self, step: int) -> list[int]:
    n = len(self.paths)
    if self.size == n:
      return list(range(n))
    positions = range(step * self.new_per_step, step * self.new_per_step + self.size)
    return [int(np.random.default_rng([self.seed, 1, p // n]).permutation(n)[p % n]) for p in positions]

  def sample(self, step: int, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """`n` slices drawn uniformly from all slices of the step's pool."""
    ids = self.volume_ids(step)
    self.loaded = {i: self.loaded[i] if i in self.loaded else axial_slices(self.paths[i]) for i in ids}
    stacks = [self.loaded[i] for i in ids]
    ends = np.cumsum([len(s) for s in stacks])
    picks = rng.integers(0, ends[-1], n)
    which = np.searchsorted(ends, picks, side="right")
    return [stacks[v][p - (ends[v] - len(stacks[v]))] for v, p in zip(which, picks)]


def make_batch(config, pool: SlicePool, step: int, grid: tuple[int, int], executor) -> dict[str, np.ndarray]:
  """Crop-major multi-crop batch: global (2B, G, G, 3), local (n_local B, L, L, 3)[, gram (2B, S, S, 3)],
  masks (2B, N) and the masked-patch gather arrays."""
  b, d = config.batch_size, config.data
  slices = pool.sample(step, np.random.default_rng([config.seed, 0, step]), b)

  def crops(i):
    rng = np.random.default_rng([config.seed, 2, step, i])
    return augment.multi_crop(slices[i], rng, d.global_size, d.local_size, d.n_local, tuple(d.global_scale),
                              tuple(d.local_scale), config.gram.crop_size if config.gram.weight else 0,
                              config.gram.distortions)

  per_slice = list(executor.map(crops, range(b)) if executor else map(crops, range(b)))
  crop_major = lambda kind: np.stack([c[kind][k] for k in range(len(per_slice[0][kind])) for c in per_slice])
  m = config.masking
  masks = masking.collate_masks(np.random.default_rng([config.seed, 3, step]), 2 * b, grid, m.probability,
                                tuple(m.ratio), m.min_patches, m.min_aspect, m.max_fraction)
  return {"global": crop_major("global"), "local": crop_major("local"), "masks": masks["masks"],
          "mask_indices": masks["indices"], "mask_weights": masks["weights"],
          **({"gram": crop_major("gram")} if "gram" in per_slice[0] else {})}


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
          "teacher_temp": cosine_schedule(step, t.temp, t.temp, temp_warmup, temp_warmup, t.warmup_temp)}


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
  local_weight: float
  ibot_weight: float
  koleo_weight: float
  sinkhorn_iterations: int
  gram_weight: float
  gram_img_level: bool
  clip_norm: float
  b1: float
  b2: float
  eps: float


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


def build_networks(config) -> tuple[Networks, dict | None]:
  """The step's Networks, and the Gram teacher's loaded variables when gram.checkpoint names one."""
  if config.batch_size < 2 or config.data.n_local < 1:
    raise ConfigError(f"batch_size={config.batch_size}, data.n_local={config.data.n_local}: KoLeo needs a batch "
                      "of at least 2 and the DINO loss at least one local crop")
  name, overrides = architecture(config)
  student = models.create(name, **overrides, dtype=config.model.dtype, drop_path=config.model.drop_path)
  teacher = models.create(name, **overrides, dtype=config.model.dtype, drop_path=0.0)
  gram_teacher, gram_variables = teacher, None
  if not config.gram.weight and (config.gram.checkpoint or config.gram.crop_size):
    raise ConfigError("gram.checkpoint and gram.crop_size need gram.weight > 0 (Gram anchoring is off)")
  if config.gram.weight and config.gram.checkpoint:
    if models.family_of(models.read_model_json(config.gram.checkpoint)["name"]) != "dinov3":
      raise ConfigError(f"gram.checkpoint {config.gram.checkpoint} is not a DINOv3-family model")
    gram_teacher, gram_variables = models.load(config.gram.checkpoint)
    gram_teacher = gram_teacher.clone(dtype=config.model.dtype, drop_path=0.0)
  gram_size = config.gram.crop_size or config.data.global_size
  h = config.heads
  networks = Networks(
      student, teacher, gram_teacher, DINOHead(h.dino_prototypes, h.hidden_dim, h.bottleneck_dim),
      DINOHead(h.ibot_prototypes, h.hidden_dim, h.bottleneck_dim), config.batch_size, config.data.n_local,
      student.token_grid((config.data.global_size,) * 2), gram_teacher.token_grid((gram_size,) * 2),
      config.loss.student_temp, config.loss.local_weight, config.loss.ibot_weight, config.loss.koleo_weight,
      config.loss.sinkhorn_iterations, config.gram.weight, config.gram.img_level, config.optim.clip_norm,
      config.optim.b1, config.optim.b2, config.optim.eps)
  return networks, gram_variables


def adam(networks: Networks) -> optax.GradientTransformation:
  return optax.scale_by_adam(b1=networks.b1, b2=networks.b2, eps=networks.eps)


def parameter_plan(params: dict, depth: int, layer_decay: float, patch_embed_mult: float) -> dict:
  """Per-parameter constants of the update, as DINOv2's `get_params_groups_with_decay`:
  lr_scale  layer_decay ** (depth + 1 - layer): patch embedding and tokens are layer 0, block i is
            layer i + 1, the final norm and the heads depth + 1; the patch embedding also x patch_embed_mult
  decay     1 where weight decay applies: not biases, norms, LayerScale gammas or tokens
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
          "decay": jax.tree_util.tree_map_with_path(lambda p, d: float(d and names(p)[1] not in TOKENS), decays),
          "last": jax.tree_util.tree_map_with_path(lambda p, _: float("last_layer" in names(p)), params)}


def initial_state(config, networks: Networks, gram_variables) -> dict:
  init_rng, dino_rng, ibot_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  backbone = models.init_params(networks.student, init_rng, (config.data.global_size,) * 2)["params"]
  if config.model.checkpoint:
    backbone = build.with_checkpoint(backbone, config.model.checkpoint, (), "backbone")
  features = jnp.zeros((1, networks.student.width), jnp.float32)
  student = {"backbone": backbone,
             "dino_head": networks.dino_head.init(dino_rng, features)["params"],
             "ibot_head": networks.ibot_head.init(ibot_rng, features)["params"]}
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
  state = {"step": jnp.zeros((), jnp.int32), "rng": train_rng, "student": copy(student), "teacher": copy(student),
           "opt": adam(networks).init(student)}
  if config.gram.weight:
    state["gram"] = copy(gram_variables["params"] if gram_variables else backbone)
  return state


# ------------------------------------------------------------------------------- the step


def train_step(state, batch, sched, plan, networks: Networks, use_gram: bool, state_sharding):
  n = networks
  b, n_global = n.batch_size, 2
  global_rng, local_rng = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
  head = lambda module, params, x: module.apply({"params": params}, x)
  masked = lambda tokens: tokens.reshape(-1, tokens.shape[-1])[batch["mask_indices"]]

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
                                 dino_targets, n.local_weight, n.student_temp)
    terms["ibot"] = losses.ibot_loss(head(n.ibot_head, params["ibot_head"], masked(g["tokens"])), ibot_targets,
                                     batch["mask_weights"], n_global * b, n.student_temp)
    cls = g["pooled"].reshape(n_global, b, -1)
    terms["koleo"] = sum(losses.koleo_loss(cls[i]) for i in range(n_global)) / n_global
    total = terms["dino"] + n.ibot_weight * terms["ibot"] + n.koleo_weight * n_global * terms["koleo"]
    if use_gram:
      terms["gram"] = losses.gram_loss(g["tokens"], gram_tokens, n.student_grid, n.gram_grid, n.gram_img_level)
      total = total + n.gram_weight * terms["gram"]
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
  """Crops and masks split over the mesh along their first axis; the masked-patch arrays replicated."""
  split, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  return {k: parallel.put_global(v, whole if k.startswith("mask_") else split) for k, v in batch.items()}


# ------------------------------------------------------------------------------- the run


def run(config, workdir, progress: bool = True) -> dict:
  """Pretrain as `config` says, resuming from workdir's checkpoint; returns (and writes) result.json."""
  start_time = time.time()
  paths = list_volumes(config.data.folders)
  networks, gram_variables = build_networks(config)
  workdir, config_dict = fit.start_run(config, workdir)
  mesh = parallel.make_mesh()
  if config.batch_size % mesh.devices.size:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {mesh.devices.size} devices")
  replicated = parallel.replicated(mesh)
  result_path, backbone_dir = workdir / "result.json", workdir / "backbone"
  if result_path.exists() and backbone_dir.exists():
    log.info("%s has finished already: %s", workdir, backbone_dir)
    return json.loads(result_path.read_text())

  state = parallel.put_global(initial_state(config, networks, gram_variables), replicated)
  plan = parallel.put_global(jax.tree_util.tree_map(np.float32, parameter_plan(
      state["student"], networks.student.depth, config.optim.layer_decay, config.optim.patch_embed_lr_mult)),
      replicated)
  ckpts = RunCheckpoints(workdir)
  host = {"train_seconds": 0.0}
  restored = ckpts.restore_latest(fit.abstract_of(state))
  if restored is not None:
    state, host = restored
  step, total_steps = int(state["step"]), config.epochs * config.epoch_length
  if restored is not None:
    log.info("resumed %s at step %d", workdir, step)
  writer = fit.Writer(workdir, step)
  pool = SlicePool(paths, config.seed, config.data.pool_volumes, config.data.new_volumes_per_step)
  executor = concurrent.futures.ThreadPoolExecutor(config.data.num_workers) if config.data.num_workers else None
  log.info("pretraining %s on %d volumes: %d steps of %d slices", config.model.name, len(paths), total_steps,
           config.batch_size)

  preempted = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=f"pretrain {config.model.name}")
  segment_start = time.time()
  pending, last = None, {}  # the previous step's metrics, read one step late to keep the device busy
  try:
    while step < total_steps:
      if config.gram.weight and not config.gram.checkpoint and step == config.gram.teacher_step:
        state["gram"] = jax.tree_util.tree_map(jnp.array, state["teacher"]["backbone"])
      batch = place_batch(make_batch(config, pool, step, networks.student_grid, executor), mesh)
      sched = schedules(config, step)
      use_gram = bool(config.gram.weight) and step >= config.gram.teacher_step
      state, metrics = jitted_train_step(state, batch, jax.tree_util.tree_map(jnp.float32, sched), plan,
                                         networks=networks, use_gram=use_gram, state_sharding=replicated)
      if pending is not None:
        last = _check_and_log(pending, writer, config)
      pending = (step, sched, metrics)
      step += 1
      if bar is not None:
        bar.update(1)
        if last:
          bar.set_postfix(loss=f"{last['train/loss']:.4f}", lr=f"{sched['lr']:.2e}")
      if preempted or step % config.checkpoint_every_steps == 0 or step == total_steps:
        last = _check_and_log(pending, writer, config, force=True)
        pending = None
        host = {"train_seconds": host["train_seconds"] + time.time() - segment_start}
        segment_start = time.time()
        ckpts.save_latest(step, state, host)
        writer.flush()
      if preempted:
        log.warning("SIGTERM: saved the checkpoint at step %d; exiting so the run can resume", step)
        return {"status": "preempted", "step": step}
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    if bar is not None:
      bar.close()
    if executor is not None:
      executor.shutdown()

  name, overrides = architecture(config)
  backbone = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), state["teacher"]["backbone"])
  result = {"config": config_dict, "model": name, "steps": total_steps, "volumes": len(paths),
            "backbone": str(backbone_dir), "final": last, "train_seconds": host["train_seconds"],
            "wall_seconds": time.time() - start_time, "devices": int(mesh.devices.size),
            "device_kind": jax.devices()[0].device_kind}
  writer.close()
  ckpts.close()
  if jax.process_index() == 0:
    models.save(str(backbone_dir), name, {"params": backbone}, overrides,
                provenance={"source": "mfjax pretrain", "workdir": str(workdir), "steps": total_steps})
    result_path.write_text(json.dumps(result, indent=2, sort_keys=True, default=float))
  multihost_utils.sync_global_devices("mfjax pretrain: backbone written")
  return result


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
