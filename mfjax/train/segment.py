"""`mfjax segment`: MedDINOv3's 2-D segmentation on an nnU-Net raw dataset. Read top to bottom.

workdir/
  config.json      the resolved config (a restart with a different one is refused)
  metrics.jsonl    one JSON line per logged step and per epoch (+ TensorBoard events)
  preprocessed/    resampled cases and plans.json, unless data.preprocessed names a shared folder
  plans.json       with a shared data.preprocessed: the run's copy of its plans
  backbone.json    with model.checkpoint: the checkpoint's model.json (`--predict` needs neither folder)
  checkpoints/     latest train state, for resuming (the patch sampler is a function of the step)
  best/            the final parameters (nnU-Net's checkpoint_final), used by `--predict`
  validation/      the fold's validation cases as predicted label volumes (NIfTI)
  result.json      per-class and mean 3-D Dice of the validation cases, timing

The model is `heads.Segmenter`: a DINOv3-family backbone (random, or a converted checkpoint)
and MedDINOv3's multi-scale patch decoder. Parameters are replicated and the batch is split
over every device of every process.

`import_nnunet` makes such a folder (config.json, preprocessed/plans.json, best/) from a network
nnU-Net trained with MedDINOv3's trainer, for `predict_folder`.
"""
import concurrent.futures
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from mfjax import data as mdata
from mfjax import models, parallel
from mfjax.config import ConfigError
from mfjax.data import nnunet, volumes
from mfjax.evals import segmentation
from mfjax.models import heads
from mfjax.train import build, lock, optim
from mfjax.train.checkpoints import RunCheckpoints
from mfjax.train.fit import (NonFiniteError, Writer, abstract_of, check_recorded, holds_workdir, is_remote,
                             read_run_config, start_run, workdir_path, write_atomically)
from mfjax.train.optim import make_optimizer

log = logging.getLogger("mfjax")


def _soft_dice(probs, truth, mask, smooth):
  """nnU-Net's MemoryEfficientSoftDiceLoss dice (batch_dice): per channel over the batch and
  pixels, only where `mask` (None: everywhere), then averaged over channels."""
  if mask is not None:
    probs, truth = probs * mask[..., None], truth * mask[..., None]
  axes = tuple(range(probs.ndim - 1))
  intersect, sum_pred, sum_true = (probs * truth).sum(axes), probs.sum(axes), truth.sum(axes)
  return ((2 * intersect + smooth) / jnp.maximum(sum_true + sum_pred + smooth, 1e-8)).mean()


def dice_ce_loss(logits, labels, num_classes: int, smooth: float = 1e-5, ignore_label: int | None = None):
  """nnU-Net's DC_and_CE_loss for 2-D plans: cross-entropy + (-soft Dice), the Dice of softmax
  probabilities over foreground classes, summed over the batch and pixels (batch_dice), then
  averaged over classes. Pixels labelled `ignore_label` count in neither (cross-entropy is the
  mean over the others, 0 when there are none). Returns (loss, {"ce", "dice"})."""
  logits = logits.astype(jnp.float32)
  mask = None if ignore_label is None else (labels != ignore_label).astype(jnp.float32)
  onehot = jax.nn.one_hot(labels if mask is None else jnp.where(mask > 0, labels, 0), num_classes,
                          dtype=jnp.float32)
  pixel_ce = optax.softmax_cross_entropy(logits, onehot)
  ce = pixel_ce.mean() if mask is None else (pixel_ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  dice = _soft_dice(jax.nn.softmax(logits)[..., 1:], onehot[..., 1:], mask, smooth)
  return ce - dice, {"ce": ce, "dice": dice}


def dice_bce_loss(logits, labels, regions, smooth: float = 1e-5, ignore_label: int | None = None):
  """nnU-Net's DC_and_BCE_loss for region-based datasets: binary cross-entropy on each region's
  mask (`regions`: tuples of label values) + (-soft Dice) of the sigmoids, over every region (no
  background channel), batch Dice as in dice_ce_loss. With `ignore_label`, its pixels count in
  neither, and, as in nnU-Net, the cross-entropy is summed over regions and divided by the number
  of the other pixels. Returns (loss, {"ce", "dice"})."""
  logits = logits.astype(jnp.float32)
  truth = jnp.stack([jnp.isin(labels, jnp.asarray(ids)) for ids in regions], axis=-1).astype(jnp.float32)
  pixel_bce = optax.sigmoid_binary_cross_entropy(logits, truth)
  mask = None if ignore_label is None else (labels != ignore_label).astype(jnp.float32)
  bce = pixel_bce.mean() if mask is None else (pixel_bce * mask[..., None]).sum() / jnp.maximum(mask.sum(), 1e-8)
  dice = _soft_dice(jax.nn.sigmoid(logits), truth, mask, smooth)
  return bce - dice, {"ce": bce, "dice": dice}


def patch_shape(config) -> tuple[int, int]:
  """The training and sliding-window patch (rows, columns): data.patch, square, or a pair (an
  imported nnU-Net configuration's patch_size)."""
  patch = config.data.patch
  return (int(patch), int(patch)) if isinstance(patch, (int, np.integer)) else tuple(int(p) for p in patch)


def build_segmenter(config, num_classes: int, backbone_meta: dict | None = None) -> heads.Segmenter:
  """The segmenter of `config`; `backbone_meta`: the backbone checkpoint's model.json as the run
  recorded it (BACKBONE_JSON), read in place of the checkpoint's."""
  build.use_matmul_precision(config)
  build.check_dtype(config)
  name, overrides = build.foundation_spec(config, backbone_meta)
  if models.family_of(name) != "dinov3":
    raise ConfigError(f"model.name={name!r}: the segmentation backbone must be a DINOv3-family model "
                      f"({', '.join(n for n in models.NAMES if models.family_of(n) == 'dinov3')})")
  overrides["intermediate"] = tuple(config.model.interaction_indices)
  backbone = models.create(name, **overrides)
  if any(p % backbone.patch_size for p in patch_shape(config)):
    raise ConfigError(f"data.patch={config.data.patch} is not a multiple of the patch size {backbone.patch_size}")
  return heads.Segmenter(backbone, num_classes, config.model.dtype)


def load_backbone(config, variables: dict, in_channels: int = 1) -> dict:
  """`variables` with the converted backbone put in. One input channel is repeated to the RGB the
  backbone was trained on, three are taken as they are; for any other number the patch embedding's
  RGB kernel is tiled over the channels and scaled by 3/C (timm's adapt_input_conv)."""
  if not config.model.checkpoint:
    log.warning("model.checkpoint is empty: the backbone starts from random weights")
    return variables
  adapt = None if in_channels in (1, 3) else functools.partial(adapt_patch_embed, channels=in_channels)
  return build.with_checkpoint(variables, config.model.checkpoint, ("params", "foundation"), "backbone", adapt)


def adapt_patch_embed(params: dict, channels: int) -> dict:
  """`params` of an RGB backbone with its patch embedding kernel (p, p, 3, D) made (p, p, C, D):
  the RGB kernel repeated over the C channels, cut to C, scaled by 3 / C (timm's adapt_input_conv)."""
  kernel = np.asarray(params["patch_embed"]["kernel"])
  if kernel.shape[2] != 3:
    raise ConfigError(f"the backbone's patch embedding takes {kernel.shape[2]} channels, not RGB; it cannot be "
                      f"adapted to {channels}")
  tiled = np.tile(kernel, (1, 1, -(-channels // 3), 1))[:, :, :channels] * (3.0 / channels)
  return {**params, "patch_embed": {**params["patch_embed"], "kernel": tiled.astype(kernel.dtype)}}


def make_predictor(model, mesh, batch_size: int, patch: tuple[int, int], mirror: bool):
  """predict(params, tiles (batch_size, H, W, channels) numpy, the same on every process) -> their
  flip-averaged, Gaussian-weighted logits (numpy), computed on the device in one call. A batch the
  devices do not divide (a run predicted on other devices than it trained on) is padded up."""
  sharding = parallel.batch_sharding(mesh)
  weights = jnp.asarray(segmentation.gaussian_weights(patch))
  apply = jax.jit(lambda params, images: segmentation.weighted_tile_logits(
      lambda x: model.apply({"params": params}, x).astype(jnp.float32), images, weights, mirror))
  padded_size = -(-batch_size // mesh.devices.size) * mesh.devices.size

  def predict(params, images):
    count = len(images)
    images = np.concatenate([images, np.zeros((padded_size - count, *images.shape[1:]), images.dtype)])
    logits = apply(params, parallel.put_global(images, sharding))
    return np.asarray(multihost_utils.process_allgather(logits, tiled=True))[:count]
  return predict


def segment_volume(predict, params, slices, plans, config) -> np.ndarray:
  """(Z, X', Y', channels) normalised preprocessed slices -> (Z, C, X', Y') logits by sliding window;
  `predict` from `make_predictor` (mirroring and the Gaussian are done there, on the device)."""
  patch = patch_shape(config)
  return segmentation.predict_slices(lambda images: predict(params, images), slices, patch,
                                     nnunet.num_outputs(plans), config.eval.batch_size, config.eval.step,
                                     weighted=True)


def prepare(config, num_classes: int, mesh, regions=(), ignore_label: int | None = None, in_channels: int = 1):
  """(model, train state placed on `mesh` (replicated), jitted train_step(state, batch, lr_scale)).
  `num_classes` output channels; with `regions` (tuples of label values, one per channel) the
  loss is nnU-Net's region loss (dice_bce_loss); pixels labelled `ignore_label` do not count.
  `in_channels`: the dataset's input channels."""
  model = build_segmenter(config, num_classes)
  patch = patch_shape(config)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  replicated = parallel.replicated(mesh)
  variables = jax.jit(model.init, out_shardings=replicated)(init_rng,
                                                            jnp.zeros((1, *patch, in_channels), jnp.float32))
  params = load_backbone(config, variables, in_channels)["params"]
  tx = make_optimizer(params, config.optim.clip_norm, config.optim.weight_decay, config.optim.b1, config.optim.b2,
                      config.optim.eps, decay_everything=True)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           "rng": jax.device_put(train_rng, replicated), "params": params,
           "opt": jax.jit(tx.init, out_shardings=replicated)(params)}
  group_lr = {"foundation": config.optim.lr_backbone, "decoder": config.optim.lr_decoder}

  def train_step(state, batch, lr_scale):
    rng = jax.random.fold_in(state["rng"], state["step"])

    def loss_of(params):
      logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
      if regions:
        return dice_bce_loss(logits, batch["label"], regions, ignore_label=ignore_label)
      return dice_ce_loss(logits, batch["label"], num_classes, ignore_label=ignore_label)

    (loss, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    updates = {group: jax.tree_util.tree_map(lambda u, lr=group_lr[group]: -lr * lr_scale * u, tree)
               for group, tree in updates.items()}
    new = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates), opt=opt)
    return new, {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}

  return model, state, jax.jit(train_step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def check_split(workdir, train_ids, val_ids) -> None:
  """Record the fold's cases in WORKDIR/split.json, or check that a restarted run has the same: a
  splits_final.json placed or edited since would otherwise change what a resumed run trains on."""
  split = {"train": list(train_ids), "validation": list(val_ids)}  # in order: the sampler draws by position

  def refusal(saved):
    changed = {k: len(set(saved.get(k, [])) ^ set(split[k])) for k in split}
    return (f"{workdir} was started on another split of the cases ({changed['train']} training and "
            f"{changed['validation']} validation cases differ from {workdir_path(workdir) / 'split.json'}, or their "
            "order): the fold's splits_final.json changed since. Put the old file back, or use a new --workdir")
  check_recorded(workdir, "split.json", split, refusal, what="the fold's cases")


@holds_workdir
def train(config, workdir: str, progress: bool = True) -> dict:
  start_time = time.time()
  if is_remote(workdir):
    raise ConfigError(f"--workdir {workdir}: mfjax segment writes preprocessed volumes and NIfTI predictions as "
                      "local files; use a local (or mounted) folder")
  if config.eval.save_probabilities and not config.eval.save_predictions:
    raise ConfigError("eval.save_probabilities=True writes beside the validation predictions: it needs "
                      "eval.save_predictions=True")
  if config.eval.probabilities_reader not in nnunet.NNUNET_READERS:
    raise ConfigError(f"eval.probabilities_reader={config.eval.probabilities_reader!r}: one of "
                      f"{', '.join(nnunet.NNUNET_READERS)}")
  # Config mistakes fail here, before the workdir and the (long) preprocessing.
  optim.check_optim(config.optim)
  if not config.data.raw:
    raise ConfigError("data.raw is empty: give the nnU-Net raw dataset folder (raw=PATH)")
  raw = nnunet.read_raw(config.data.raw)
  train_ids, val_ids = nnunet.fold_cases(raw, config.data.fold)
  if not (workdir_path(workdir) / "result.json").exists():  # a finished run needs no backbone checkpoint
    build_segmenter(config, num_classes=2)  # the backbone's name, overrides and patch
  # The patches of a step are a function of the step, whatever the number of threads that cut them.
  workdir, config_dict = start_run(config, workdir, changeable=("data.num_workers", "log_every_steps"))
  check_split(workdir, train_ids, val_ids)
  if (workdir / "result.json").exists():
    log.info("%s has finished already (result.json); delete it to validate the best checkpoint again", workdir)
    return json.loads((workdir / "result.json").read_text())

  # Data: the raw dataset, preprocessed once (by process 0), the fold's cases, a patch sampler.
  pre_dir = config.data.preprocessed or str(workdir / "preprocessed")
  spacing = (config.data.spacing,) * 2 if config.data.spacing else None
  parallel.on_process_zero("preprocess the dataset", nnunet.preprocess, raw, pre_dir, spacing, progress)
  plans = nnunet.preprocess(raw, pre_dir, spacing, progress=False)  # reads the finished plans
  record_sources(workdir, config, pre_dir)
  mesh = parallel.make_mesh()
  if config.batch_size % mesh.devices.size:  # (prediction pads its tile batch to the devices itself)
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {mesh.devices.size} devices")
  patch = patch_shape(config)
  sampler = nnunet.SliceSampler(pre_dir, plans, train_ids, patch, config.batch_size,
                                config.data.foreground_fraction, config.data.augment, config.seed,
                                config.data.num_workers)

  model, state, train_step = prepare(config, nnunet.num_outputs(plans), mesh, tuple(raw.regions.values()),
                                     raw.ignore_label, len(raw.channels))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  batch_sharding = parallel.batch_sharding(mesh)
  rows = parallel.process_rows(batch_sharding, config.batch_size)
  total_steps = config.epochs * config.iters_per_epoch
  log.info("%s on %s fold %s: %d train / %d validation cases, %d %s, patch %s at %s mm, %.1fM parameters, "
           "mesh %s", config.model.name, raw.name, config.data.fold, len(train_ids), len(val_ids),
           len(nnunet.targets(plans)), "regions" if raw.regions else "foreground classes", patch,
           [round(s, 3) for s in plans["target_spacing_xy"]], n_params / 1e6, dict(mesh.shape))

  # Resume.
  ckpts = RunCheckpoints(workdir, owner=True)  # holds the lock
  host = {"train_seconds": 0.0}
  restored = ckpts.restore_latest(abstract_of(state))
  if restored is not None:
    state, host = restored
    log.info("resumed %s at step %d", workdir, int(state["step"]))
  step = int(state["step"])
  writer = Writer(workdir, step)
  preemption = parallel.Preemption().start()
  segment_start = time.time()
  save = lambda s: ckpts.save_latest(s, state, {"train_seconds": host["train_seconds"] + time.time() - segment_start})

  # The loop: epochs of iterations; the poly learning-rate factor changes once per epoch. The next
  # batch is drawn and augmented on a host thread while the device runs the current step.
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=f"segment {raw.name}")
  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    upcoming = pool.submit(sampler.batch, step, rows)
    loss_sum, loss_steps = jnp.float32(0.0), 0  # this epoch's, summed on the device (no sync per step)
    while step < total_steps:
      epoch = step // config.iters_per_epoch
      lr_scale = (1 - epoch / config.epochs) ** config.optim.poly_exponent
      batch = upcoming.result()
      if step + 1 < total_steps:
        upcoming = pool.submit(sampler.batch, step + 1, rows)
      state, metrics = train_step(state, mdata.global_batch(batch, batch_sharding), jnp.float32(lr_scale))
      loss_sum, loss_steps = loss_sum + metrics["loss"], loss_steps + 1
      step += 1
      preempted = preemption.due(step)  # decided by all processes together
      if bar is not None:
        bar.update(1)
      end_of_epoch = step % config.iters_per_epoch == 0
      log_due = step % config.log_every_steps == 0 or end_of_epoch
      if log_due or preempted:  # checked before a preempted state is saved too
        values = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(values["loss"]):
          raise NonFiniteError(f"loss is {values['loss']} at step {step}; lower the learning rates or use float32")
      if log_due:
        writer.write(step, {**{f"train/{k}": v for k, v in values.items()},
                            "lr_backbone": config.optim.lr_backbone * lr_scale,
                            "lr_decoder": config.optim.lr_decoder * lr_scale})
        if bar is not None:
          bar.set_postfix(loss=f"{values['loss']:.4f}", dice=f"{values['dice']:.3f}")
      if end_of_epoch:  # the mean over the epoch's steps (since the resume, in a resumed epoch)
        writer.write(step, {"epoch": epoch + 1, "train/epoch_loss": float(loss_sum) / loss_steps})
        loss_sum, loss_steps = jnp.float32(0.0), 0
      if preempted or (end_of_epoch and (epoch + 1) % config.checkpoint_every_epochs == 0):
        writer.flush()  # first: a resume truncates lines past its checkpoint, but cannot restore missing ones
        save(step)
      if preempted:
        return preemption.stopped(step)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    preemption.stop()
    if bar is not None:
      bar.close()
  train_seconds = host["train_seconds"] + time.time() - segment_start
  if ckpts.latest.latest_step() != step:
    save(step)
  if ckpts.best.latest_step() != step:
    ckpts.save_best(step, state["params"], {"epochs": config.epochs})

  # Validation: every validation case by sliding window, Dice against the original labels.
  t0 = time.time()
  result = {"config": config_dict, "model": config.model.name, "dataset": raw.name, "fold": str(config.data.fold),
            "params_total": int(n_params), "train_seconds": train_seconds, "devices": int(mesh.devices.size),
            "device_kind": jax.devices()[0].device_kind}
  if val_ids:
    out_dir = workdir / "validation" if config.eval.save_predictions else None
    per_case = validate(model, state["params"], mesh, plans, pre_dir, val_ids, config, out_dir, progress)
    names = nnunet.target_names(plans)
    result["val"] = segmentation.summarize(per_case, names)
    result["val"]["per_case"] = {case: {metric: {names[c]: v for c, v in values.items()}
                                        for metric, values in metrics.items()} for case, metrics in per_case.items()}
    writer.write(step, {f"val/{k}": v for k, v in result["val"].items() if k.startswith("mean_")})
    log.info("validation: %s; Dice per %s: %s",
             ", ".join(f"{k} {v:.4f}" for k, v in result["val"].items() if k.startswith("mean_")),
             "region" if raw.regions else "class", ", ".join(f"{k} {v:.4f}" for k, v in result["val"]["dice"].items()))
  result["validation_seconds"] = time.time() - t0
  result["wall_seconds"] = time.time() - start_time
  writer.close()
  ckpts.close()
  parallel.on_process_zero("write result.json", write_atomically, workdir / "result.json",
                           json.dumps(result, indent=2, sort_keys=True, default=float))
  return result


def validate(model, params, mesh, plans, pre_dir, case_ids, config, out_dir, progress) -> dict:
  """{case: {"dice": {class id: value}[, "hd95": ..., "nsd": ...]}}; with `out_dir`, the predicted
  label volumes are written there, and with eval.save_probabilities nnU-Net's CASE.npz and
  CASE.pkl (`write_probabilities`) too."""
  predict = make_predictor(model, mesh, config.eval.batch_size, patch_shape(config), config.eval.mirror)
  classes, ignore = nnunet.targets(plans), plans.get("ignore_label")
  per_case = {}
  from tqdm.auto import tqdm
  layout = nnunet.voxel_layout(plans)
  save_probabilities = out_dir is not None and jax.process_index() == 0 and config.eval.get("save_probabilities")
  for case in tqdm(case_ids, desc="validation", unit="case", disable=not progress or jax.process_index() != 0):
    stored = plans["cases"][case]
    slices = np.load(os.path.join(pre_dir, case + ".npy"), mmap_mode="r")
    truth = nnunet.read_labels_in(stored["label"], layout)
    spacing = np.asarray(stored["spacing"], np.float64)  # of the axes of `layout`, as read_channels gives it
    bbox = stored["bbox"]
    prediction, probabilities = label_case(lambda chunk: segment_volume(predict, params, chunk, plans, config),
                                           slices, bbox, truth.shape, plans, config.eval.batch_size,
                                           save_probabilities)
    per_case[case] = {"dice": segmentation.dice_per_class(prediction, truth, classes, ignore)}
    if config.eval.surface_metrics:
      per_case[case].update(segmentation.surface_metrics(prediction, truth, classes, spacing,
                                                         config.eval.nsd_tolerance_mm, ignore))
    if out_dir is not None:
      def write():
        if probabilities is not None:
          write_probabilities(str(out_dir / case), probabilities, stored["image"], layout, plans, bbox,
                              config.eval.get("probabilities_reader"))
        write_prediction(str(out_dir / f"{case}.nii.gz"), prediction, stored["image"], layout)
      parallel.on_process_zero(f"write the prediction of {case}", write)
  return per_case


def label_case(logits_of: Callable, slices, bbox, shape, plans: dict, batch_size: int,
               with_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
  """(labels, probabilities) of a case on its grid of `shape` (X, Y, Z), from its (Z, X', Y')
  slices cropped at `bbox` (`segmentation.labels_in_chunks` of `logits_of`): the labels, background
  outside the crop, and, `with_probabilities`, the (X, Y, Z, C) float32 probabilities with
  background outside the crop as nnU-Net's revert_cropping_on_probabilities puts it (certain for
  labels, nothing for regions); else None."""
  probabilities = None
  if with_probabilities:
    probabilities = np.zeros((*shape, nnunet.num_outputs(plans)), np.float32)
    if not plans.get("regions_class_order"):
      probabilities[..., 0] = 1
  labels = segmentation.labels_in_chunks(
      logits_of, slices, tuple(hi - lo for lo, hi in bbox[:2]), plans.get("regions_class_order", ()), batch_size,
      probabilities=None if probabilities is None else probabilities[tuple(slice(lo, hi) for lo, hi in bbox)])
  return nnunet.uncrop(labels, bbox, shape), probabilities


# What a run keeps of the folders it was started from, so that it predicts without them.
OWN_PLANS, BACKBONE_JSON = "plans.json", "backbone.json"


def record_sources(workdir, config, pre_dir: str) -> None:
  """Copy into the run the plans of a shared data.preprocessed folder and the backbone
  checkpoint's model.json (on process zero)."""
  def write():
    if os.path.abspath(pre_dir) != os.path.abspath(workdir / "preprocessed"):
      with open(os.path.join(pre_dir, nnunet.PLANS_JSON)) as f:
        write_atomically(workdir / OWN_PLANS, f.read())
    if config.model.checkpoint:
      write_atomically(workdir / BACKBONE_JSON, json.dumps(models.read_model_json(config.model.checkpoint), indent=2))
  parallel.on_process_zero("record the run's plans and backbone", write)


def read_segment_run(workdir):
  """(workdir path, config, plans) of a started `mfjax segment` run."""
  workdir, config = read_run_config(workdir)
  if "iters_per_epoch" not in config:
    raise ConfigError(f"{workdir} is not an `mfjax segment` run")
  pre_dir = config.data.preprocessed or str(workdir / "preprocessed")
  own = workdir / OWN_PLANS
  path = own if own.exists() else os.path.join(pre_dir, nnunet.PLANS_JSON)  # runs before the copy: the folder's
  try:
    with open(path) as f:
      return workdir, config, json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path} not found: {workdir} was trained on data.preprocessed={pre_dir}, which is gone "
                      "(runs started since mfjax kept a copy of the plans do not need it)") from None


def load_run(workdir, mesh) -> tuple[dict, Any, Callable]:
  """(plans, config, logits_of(normalised (Z, X', Y', channels) slices) -> (Z, C, X', Y')) of a
  finished segment run."""
  workdir, config, plans = read_segment_run(workdir)
  recorded = workdir / BACKBONE_JSON
  model = build_segmenter(config, nnunet.num_outputs(plans),
                          json.loads(recorded.read_text()) if recorded.exists() else None)
  channels = len(nnunet.channel_names(plans))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, *patch_shape(config), channels), jnp.float32))
  ckpts = RunCheckpoints(workdir)
  restored = ckpts.restore_best(jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)), abstract["params"]))
  ckpts.close()
  if restored is None:
    raise ConfigError(f"{workdir} has no final parameters (best/): the run has not finished")
  params = restored[0]
  predict = make_predictor(model, mesh, config.eval.batch_size, patch_shape(config), config.eval.mirror)
  return plans, config, lambda slices: segment_volume(predict, params, slices, plans, config)


IMPORT_OVERRIDABLE = ("model.dtype", "eval.")  # what --config.* may change in an imported run
NNUNET_FILES = ("plans.json", "dataset.json")  # an imported run keeps them as preprocessed/nnunet_*


def nnunet_model_paths(model_folder: str, fold, checkpoint: str = "checkpoint_final.pth") -> tuple[str, dict]:
  """(the absolute MODEL_FOLDER, {plans.json, dataset.json, checkpoint: path}) of one fold of an
  nnU-Net model folder; a missing file is an error naming it."""
  folder = os.path.abspath(os.path.expanduser(str(model_folder)))
  paths = {name: os.path.join(folder, name) for name in NNUNET_FILES}
  paths["checkpoint"] = os.path.join(folder, f"fold_{fold}", checkpoint)
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if missing:
    raise ConfigError(f"{folder} is not an nnU-Net model folder with fold {fold}: {', '.join(missing)} not found")
  return folder, paths


def import_nnunet_folds(model_folder: str, folds, workdir: str, checkpoint: str = "checkpoint_final.pth",
                        **kwargs) -> list[str]:
  """`import_nnunet` for each of `folds`: one fold into `workdir`, several into workdir/fold_F
  (a folder that `--predict` reads as all of its runs: `run_folders`). Every fold's files are
  checked before any is converted. Returns the run folders."""
  folds = [str(f) for f in folds]
  for fold in folds:
    nnunet_model_paths(model_folder, fold, checkpoint)
  workdirs = [str(workdir)] if len(folds) == 1 else [os.path.join(str(workdir), f"fold_{f}") for f in folds]
  parallel.maybe_initialize_distributed()
  # Every fold converted and checked before any run folder is written: a bad fold leaves no partial ensemble.
  converted = [read_nnunet_fold(model_folder, fold, checkpoint, **kwargs) for fold in folds]
  for fold_run, run in zip(converted, workdirs):
    with lock.holding(workdir_path(run)):  # not into a run another job trains or imports
      write_imported_run(fold_run, run)
  return workdirs


def run_folders(workdirs) -> list[str]:
  """The runs that `--workdir`s name: a run folder, or a folder whose fold_* subfolders are runs
  (`import_nnunet_folds`'s, or folds trained into RUNS/fold_F), which stands for all of them."""
  workdirs = [workdirs] if isinstance(workdirs, (str, os.PathLike)) else list(workdirs)
  runs = []
  for workdir in workdirs:
    path = workdir_path(workdir)
    folds = [] if (path / "config.json").exists() or not path.is_dir() else sorted(path.glob("fold_*"),
                                                                                      key=lambda p: p.name)
    if any(p.name == "fold_all" for p in folds) and len(folds) > 1:  # nnU-Net's default ensemble: the 5 folds
      log.warning("%s: fold_all is left out of the ensemble of its numbered folds; --workdir %s predicts with it",
                  path, path / "fold_all")
      folds = [p for p in folds if p.name != "fold_all"]
    unstarted = [p.name for p in folds if not (p / "config.json").exists()]
    if unstarted:
      raise ConfigError(f"{path}: its fold folder(s) {', '.join(unstarted)} hold no run (no config.json); "
                        "finish them, or name the finished folds with --workdir each")
    if folds:
      log.info("%s holds %d runs: %s", path, len(folds), ", ".join(p.name for p in folds))
    runs.extend([str(p) for p in folds] or [workdir])
  return runs


def import_nnunet(model_folder: str, fold, workdir: str, checkpoint: str = "checkpoint_final.pth",
                  interaction_indices=(2, 5, 8, 11), rope_dtype: str = "bfloat16", config_overrides=()) -> dict:
  """A finished run folder, for `--predict`, from one fold of an nnU-Net model folder: `read_nnunet_fold`
  written into `workdir` by `write_imported_run`. Returns the plans."""
  return write_imported_run(read_nnunet_fold(model_folder, fold, checkpoint, interaction_indices, rope_dtype,
                                             config_overrides), workdir)


def read_nnunet_fold(model_folder: str, fold, checkpoint: str = "checkpoint_final.pth",
                     interaction_indices=(2, 5, 8, 11), rope_dtype: str = "bfloat16", config_overrides=()) -> dict:
  """A finished run, for `--predict`, from a MedDINOv3 network trained by nnU-Net, converted and
  checked in memory: {config, plans, params, meta}, which `write_imported_run` writes.
  MODEL_FOLDER (nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION) holds plans.json,
  dataset.json and fold_F/CHECKPOINT (Primus_Multiscale's `network_weights`). The plans are
  nnU-Net's normalisation, spacing, labels and voxel layout (`nnunet.plans_from_nnunet`).
  `rope_dtype`: MedDINOv3's networks ran RoPE in bfloat16. `config_overrides`: `--config.KEY=VALUE`
  of the prediction settings (model.dtype, eval.batch_size, eval.step, eval.mirror)."""
  from configs import segment as segment_config
  from convert import core as convert_core
  from convert import dinov3 as convert_dinov3
  folder, paths = nnunet_model_paths(model_folder, fold, checkpoint)
  meta = {}
  for name in NNUNET_FILES:
    try:
      with open(paths[name]) as f:
        meta[name] = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{paths[name]}: not valid JSON ({e})") from e
  raw = convert_core.read_file(paths["checkpoint"])
  init_args = raw.get("init_args", {}) if isinstance(raw, dict) else {}
  configuration = init_args.get("configuration") or os.path.basename(folder).rpartition("__")[2]
  plans = nnunet.plans_from_nnunet(meta["plans.json"], meta["dataset.json"], configuration, paths["plans.json"],
                                   paths["dataset.json"])
  if len(plans["channel_names"]) != 1:
    raise ConfigError(f"{paths['dataset.json']}: {len(plans['channel_names'])} input channels; MedDINOv3's "
                      "Primus_Multiscale takes one (repeated to RGB)")
  name, overrides, params = convert_dinov3.segmentation_network(raw, paths["checkpoint"], tuple(interaction_indices),
                                                                rope_dtype)
  mirror_axes = raw.get("inference_allowed_mirroring_axes") if isinstance(raw, dict) else None
  plans["imported_from"] = {"folder": folder, "fold": str(fold), "checkpoint": paths["checkpoint"],
                            "configuration": configuration, "trainer": raw.get("trainer_name"),
                            "epoch": raw.get("current_epoch"), "mirroring_axes": mirror_axes}

  config = segment_config.get_config(f"model={name}").to_dict()
  config["data"].update(patch=plans.pop("patch_size"), fold=str(fold), spacing=0.0)
  config["model"].update(overrides=overrides, interaction_indices=list(interaction_indices))
  config["eval"]["mirror"] = [int(a) for a in mirror_axes or ()]  # [] without mirroring
  config["imported_from"] = plans["imported_from"]
  config = ml_collections.ConfigDict(config)
  from mfjax.cli import set_field
  for item in config_overrides:
    key, eq, value = item.removeprefix("--config.").partition("=")
    if not eq or not key.startswith(IMPORT_OVERRIDABLE):
      raise ConfigError(f"{item}: an imported run takes --config.model.dtype=... and --config.eval.*=... only "
                        "(the network and the plans come from the nnU-Net model folder)")
    set_field(config, key, value)
  outputs = nnunet.num_outputs(plans)
  classes = int(params["decoder"]["classifier"]["kernel"].shape[-1])
  if classes != outputs:
    raise ConfigError(f"{paths['checkpoint']}: the network predicts {classes} channels, but {paths['dataset.json']}'s "
                      f"labels need {outputs}")
  model = build_segmenter(config, outputs)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *patch_shape(config), 1), jnp.float32))
  expected = jax.tree_util.tree_map(lambda x: x.shape, abstract["params"])
  if jax.tree_util.tree_map(np.shape, params) != expected:
    raise ConfigError(f"{paths['checkpoint']}: the converted network does not fit {name} with "
                      f"interaction indices {list(interaction_indices)}")
  return {"config": config, "plans": plans, "params": params, "meta": meta}


def write_imported_run(fold_run: dict, workdir: str) -> dict:
  """Write a `read_nnunet_fold` run into `workdir`: config.json, preprocessed/plans.json (and
  nnU-Net's own files) and best/ (the converted network). Returns the plans."""
  config, plans, params, meta = (fold_run[k] for k in ("config", "plans", "params", "meta"))
  source = plans["imported_from"]
  workdir, _ = start_run(config, workdir)
  pre_dir = workdir / "preprocessed"
  pre_dir.mkdir(parents=True, exist_ok=True)

  def write_plans():
    (pre_dir / nnunet.PLANS_JSON).write_text(json.dumps(plans, indent=2))
    for name in NNUNET_FILES:  # for nnUNetv2_ensemble, beside saved probabilities
      (pre_dir / f"nnunet_{name}").write_text(json.dumps(meta[name], indent=2))
  parallel.on_process_zero("write the imported plans", write_plans)
  mesh = parallel.make_mesh()
  ckpts = RunCheckpoints(workdir)
  ckpts.save_best(0, jax.device_put(params, parallel.replicated(mesh)), {"imported_from": plans["imported_from"]},
                  replace=True)
  ckpts.close()
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  log.info("imported %s (%s, fold %s, %s) into %s: %s, %.1fM parameters, %d output channels, patch %s at %s mm, "
           "mirroring %s", source["folder"], source["configuration"], source["fold"],
           os.path.basename(source["checkpoint"]), workdir, config.model.name, n / 1e6, nnunet.num_outputs(plans),
           patch_shape(config), plans["target_spacing_xy"], config.eval.mirror)
  return plans


# What must agree for several runs' logits to be averaged: the same input resampling and
# normalisation, and the same output channels.
ENSEMBLE_KEYS = ("modality", "channel_names", "normalization", "target_spacing_xy", "intensity", "use_mask_for_norm",
                 "labels", "regions", "regions_class_order", "ignore_label")


POSTPROCESSING_KEYS = ("labels", "regions", "regions_class_order", "ignore_label")  # what the steps refer to


def determine_postprocessing(workdirs, out_path: str, progress: bool = True) -> dict:
  """nnU-Net's determine_postprocessing over the validation predictions of finished runs (e.g. the
  5 folds; a folder of fold_* runs stands for all of them): writes `out_path` (JSON: the steps,
  the Dice before and after) for `predict_folder`."""
  workdirs = run_folders(workdirs)
  cases, plans = [], None
  for workdir in workdirs:
    workdir, _, these = read_segment_run(workdir)
    if "imported_from" in these:
      raise ConfigError(f"{workdir} was imported from nnU-Net ({these['imported_from']['folder']}) and has no "
                        "validation predictions of its own: give nnU-Net's postprocessing.json (in its "
                        "crossval_results_folds_* folder) to --predict --postprocessing instead")
    if plans is not None and any(these.get(k) != plans.get(k) for k in POSTPROCESSING_KEYS):
      raise ConfigError(f"{workdir} and {workdirs[0]} segment different labels; their postprocessing cannot be "
                        "determined together")
    plans = plans or these
    folder = workdir / "validation"
    names = volumes.volume_files(folder, ".nii.gz") if folder.exists() else []
    if not names:
      raise ConfigError(f"{folder}: no validation predictions (a run with fold=all, with "
                        "eval.save_predictions=False, or not finished)")
    for name in names:
      case = volumes.strip_ending(name)
      if case not in these["cases"]:
        raise ConfigError(f"{folder / name}: {case} is not a case of the run's dataset")
      cases.append((functools.partial(_labels_of, str(folder / name)),
                    functools.partial(_labels_of, these["cases"][case]["label"])))
  values = nnunet.targets(plans)
  targets = {name: values[c] for c, name in nnunet.target_names(plans).items()}
  foreground = [int(c) for c in plans["labels"] if int(c) > 0]
  result = segmentation.determine_postprocessing(cases, targets, foreground, plans.get("ignore_label"),
                                                 log=log.info, progress=progress)
  result.update(runs=[str(w) for w in workdirs], **{k: plans.get(k) for k in POSTPROCESSING_KEYS})
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  log.info("postprocessing over %d validation cases: mean Dice %.5f -> %.5f, %d step(s); written to %s",
           result["cases"], result["before"]["foreground_mean"], result["after"]["foreground_mean"],
           len(result["steps"]), out_path)
  return result


def write_prediction(path: str, labels: np.ndarray, image_path: str, layout) -> str:
  """Write (X, Y, Z) labels predicted from `image_path` read in `layout` on its voxel grid, in the
  file's own voxel order and affine, as nnU-Net writes them (tools that compare arrays without
  reorienting, nnUNetv2_evaluate_folder and challenge scorers, line them up with the labels)."""
  return volumes.write_volume(path, nnunet.file_order(labels, image_path, layout),
                              affine=volumes.file_affine(image_path))


def write_probabilities(out_truncated: str, probabilities: np.ndarray, image_path: str, layout, plans: dict,
                        bbox=None, reader: str | None = None) -> str:
  """nnU-Net's --save_probabilities for one case: OUT.npz ('probabilities': float32 (C, k, j, i)
  in the array order of the run's nnU-Net reader, `nnunet.reader_of`, or of `reader` for mfjax's
  runs) and OUT.pkl (what that reader and nnU-Net's preprocessing record of the case), so that
  nnUNetv2_ensemble averages them with nnU-Net's own. `probabilities`: (X, Y, Z, C) on the grid of
  `image_path` read in `layout`; `bbox`: the crop, recorded in nnU-Net's (transposed) axis order
  for an imported run."""
  import pickle
  reader = nnunet.reader_of(plans, reader)
  array = nnunet.reader_array(probabilities, image_path, layout, reader)
  properties = nnunet.reader_properties(image_path, reader)
  if "transpose_forward" in plans and bbox is not None:  # (rows, columns, slices) -> its (slices, rows, columns)
    nnunet_order = [2, 0, 1]
    properties.update(
        shape_before_cropping=tuple(int(probabilities.shape[a]) for a in nnunet_order),
        bbox_used_for_cropping=[list(bbox[a]) for a in nnunet_order],
        shape_after_cropping_and_before_resampling=tuple(int(bbox[a][1] - bbox[a][0]) for a in nnunet_order))
  os.makedirs(os.path.dirname(os.path.abspath(out_truncated)), exist_ok=True)
  for ending, write in ((".pkl", lambda f: pickle.dump(properties, f)),
                        (".npz", lambda f: np.savez_compressed(f, probabilities=np.moveaxis(array, -1, 0)))):
    partial = out_truncated + ending + ".partial"  # not CASE.*.npz, which nnU-Net's ensembling would list
    with open(partial, "wb") as f:
      write(f)
    os.replace(partial, out_truncated + ending)
  return out_truncated + ".npz"


def _labels_of(path: str) -> np.ndarray:
  return volumes.read_labels(path)[0]


def read_postprocessing(path: str, plans: dict) -> list:
  """The steps of a `determine_postprocessing` file, checked to refer to the labels of `plans`; or
  of nnU-Net's own postprocessing.json (`nnunet_postprocessing_steps`)."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: not a readable postprocessing file ({e})") from e
  if isinstance(data, dict) and "postprocessing_fns" in data:
    return nnunet_postprocessing_steps(data, plans, path)
  if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
    raise ConfigError(f"{path}: not a postprocessing file (no 'steps'); write one with "
                      "`mfjax segment --determine-postprocessing`, or give nnU-Net's postprocessing.json")
  differ = [k for k in POSTPROCESSING_KEYS if data.get(k) != plans.get(k)]
  if differ:
    raise ConfigError(f"{path} was determined for other labels than the run's ({', '.join(differ)} differ)")
  return [_step_targets(step, plans, path) for step in data["steps"]]


def _step_targets(items, plans: dict, path: str) -> list:
  """A postprocessing step's targets (label values, or lists of them for regions), checked to be
  label values of `plans`."""
  known = {int(c) for c in plans["labels"] if int(c) > 0}
  items_list = items if isinstance(items, list) else [items]
  try:
    targets = [tuple(int(v) for v in item) if isinstance(item, list) else int(item) for item in items_list]
  except (TypeError, ValueError):
    raise ConfigError(f"{path}: step {items!r} is not a label value, a region or a list of them") from None
  unknown = sorted({int(v) for t in targets for v in np.atleast_1d(t)} - known)
  if not targets:
    raise ConfigError(f"{path}: an empty step {items!r}")
  if unknown:
    raise ConfigError(f"{path}: step {items!r} names label value(s) {unknown} that the run's labels "
                      f"({sorted(known)}) do not have")
  return targets


def nnunet_postprocessing_steps(data: dict, plans: dict, path: str) -> list:
  """The steps of nnU-Net's own postprocessing.json (its determine_postprocessing, written beside
  the cross-validation predictions): each `remove_all_but_largest_component_from_segmentation`
  with its labels_or_regions, as `apply_postprocessing` steps. A label list and a region (a tuple,
  a list once in JSON) select the same voxels, so both read as the union of their values."""
  fns, kwargs = data.get("postprocessing_fns"), data.get("postprocessing_kwargs")
  if not isinstance(fns, list) or not isinstance(kwargs, list) or len(fns) != len(kwargs):
    raise ConfigError(f"{path}: postprocessing_fns and postprocessing_kwargs must be lists of one length")
  steps = []
  for fn, kw in zip(fns, kwargs):
    if fn != "remove_all_but_largest_component_from_segmentation":
      raise ConfigError(f"{path}: step {fn!r}: mfjax applies nnU-Net's "
                        "remove_all_but_largest_component_from_segmentation steps only")
    steps.append(_step_targets(kw.get("labels_or_regions") if isinstance(kw, dict) else None, plans, path))
  return steps


def input_cases(input_dir: str, channels: int) -> dict[str, list[str]]:
  """{case: its file per channel} of a folder of volumes named as nnU-Net's imagesTs (CASE_0000,
  CASE_0001, ... .nii.gz). With one channel every volume is a case (CASE_0000.nii.gz is CASE, any
  other name its own stem). A case missing a channel, a file of a channel the runs do not have
  (CASE_0001 beside CASE_0000 for one channel), or two files of one case and channel (CASE.nii
  and CASE.nii.gz, CASE_0000.nii.gz and CASE.nii.gz) is an error naming them."""
  names = volumes.volume_files(input_dir)
  if not names:
    raise ConfigError(f"{input_dir}: no NIfTI volumes ({', '.join(volumes.NIFTI_ENDINGS)})")
  if channels == 1:
    stems = {name: volumes.strip_ending(name) for name in names}
    for name, stem in stems.items():
      case, sep, index = stem.rpartition("_")
      if sep and len(index) == 4 and index.isdigit() and int(index) > 0 and f"{case}_0000" in stems.values():
        raise ConfigError(f"{os.path.join(input_dir, name)}: channel {int(index)} of {case}, but the runs take one "
                          "channel")
    cases: dict[str, list[str]] = {}
    for name, stem in stems.items():
      cases.setdefault(stem[:-5] if stem.endswith("_0000") else stem, []).append(name)
    twice = {case: files for case, files in cases.items() if len(files) > 1}
    if twice:
      raise ConfigError(f"{input_dir}: several files for one case: " + "; ".join(
          f"{case}: {', '.join(files)}" for case, files in sorted(twice.items())[:10]))
    return {case: [os.path.join(input_dir, files[0])] for case, files in cases.items()}
  found: dict[str, dict[int, str]] = {}
  for name in names:
    stem = volumes.strip_ending(name)
    case, sep, index = stem.rpartition("_")
    if not (sep and len(index) == 4 and index.isdigit()):
      raise ConfigError(f"{os.path.join(input_dir, name)}: the runs take {channels} channels, named "
                        "CASE_0000 ... CASE_%04d" % (channels - 1))
    if int(index) >= channels:
      raise ConfigError(f"{os.path.join(input_dir, name)}: channel {int(index)}, but the runs take {channels}")
    if int(index) in found.get(case, {}):
      raise ConfigError(f"{input_dir}: several files for channel {int(index)} of {case}: "
                        f"{os.path.basename(found[case][int(index)])}, {name}")
    found.setdefault(case, {})[int(index)] = os.path.join(input_dir, name)
  incomplete = {case: sorted(set(range(channels)) - set(files)) for case, files in found.items()
                if len(files) != channels}
  if incomplete:
    raise ConfigError(f"{input_dir}: cases without every channel (missing channel numbers): "
                      + ", ".join(f"{case} {missing}" for case, missing in sorted(incomplete.items())[:10]))
  return {case: [files[c] for c in range(channels)] for case, files in sorted(found.items())}


def predict_folder(workdirs, input_dir: str, out_dir: str, progress: bool = True,
                   continue_prediction: bool = False, postprocessing: str | None = None,
                   save_probabilities: bool = False, probabilities_reader: str | None = None) -> list[str]:
  """Segment every CASE_0000.nii.gz (or *.nii.gz, .nii) in `input_dir` with the final parameters of one
  finished run, or of several (e.g. the 5 folds) whose logits are averaged, as nnU-Net's
  prediction with several folds does; writes OUT_DIR/CASE.nii.gz (.nii for a .nii input) label
  volumes aligned with their inputs (each written whole or not at all; never over an input).
  Every input's header is checked before the first case. `continue_prediction` skips the cases whose
  output exists, not empty (nnU-Net's --continue_prediction); otherwise they are predicted again.
  `postprocessing`: a file of `determine_postprocessing`, applied to each prediction.
  `save_probabilities`: also CASE.npz and CASE.pkl as nnU-Net's --save_probabilities writes them
  (`write_probabilities`; before postprocessing, as nnU-Net's), for nnUNetv2_ensemble, in the
  array order of `probabilities_reader` (mfjax's runs; default SimpleITKIO) or the imported run's.
  A folder of fold_* runs stands for all of them (`run_folders`)."""
  parallel.maybe_initialize_distributed()  # under a multi-process launcher the processes share the cases
  workdirs = run_folders(workdirs)
  mesh = parallel.make_mesh()
  runs = [load_run(workdir, mesh) for workdir in workdirs]
  plans, config, _ = runs[0]
  for workdir, (other, _, _) in zip(workdirs[1:], runs[1:]):
    differ = [k for k in ENSEMBLE_KEYS if other.get(k) != plans.get(k)]
    differ += ["voxel layout"] if nnunet.voxel_layout(other) != nnunet.voxel_layout(plans) else []
    if differ:
      raise ConfigError(f"{workdir} and {workdirs[0]} cannot be ensembled: their plans differ in {', '.join(differ)} "
                        "(train the folds on one data.preprocessed folder)")
  if len(runs) > 1:
    log.info("averaging the logits of %d runs: %s", len(runs), ", ".join(map(str, workdirs)))
  steps = read_postprocessing(postprocessing, plans) if postprocessing else []
  names = nnunet.channel_names(plans)
  layout = nnunet.voxel_layout(plans)
  inputs = input_cases(input_dir, len(names))
  ending_of = {case: volumes.nifti_ending(files[0]) for case, files in inputs.items()}
  if os.path.realpath(out_dir) == os.path.realpath(input_dir):
    raise ConfigError(f"--out {out_dir} is the input folder: the next prediction from it would read the "
                      "predictions as inputs; choose another --out folder")
  given = {os.path.realpath(f) for files in inputs.values() for f in files}
  for case in inputs:
    output = os.path.join(out_dir, case + ending_of[case])
    if os.path.realpath(output) in given:
      raise ConfigError(f"--out {out_dir}: the prediction {output} would replace that input image; choose another "
                        "--out folder")
  os.makedirs(out_dir, exist_ok=True)
  if save_probabilities:
    reader = nnunet.reader_of(plans, probabilities_reader)
    if reader == "SimpleITKIO":
      nnunet.reader_properties(next(iter(inputs.values()))[0], reader)  # SimpleITK is there, before any work
    _copy_nnunet_files(workdirs[0], out_dir)
  endings = lambda case: (ending_of[case], ".npz", ".pkl") if save_probabilities else (ending_of[case],)
  if continue_prediction:  # decided where the outputs are written (process 0), the same on every process
    written_whole = lambda path: os.path.isfile(path) and os.path.getsize(path) > 0  # an empty file is not done
    done = np.array([all(written_whole(os.path.join(out_dir, case + e)) for e in endings(case)) for case in inputs])
    done = np.asarray(multihost_utils.broadcast_one_to_all(done)) if jax.process_count() > 1 else done
    if done.any():
      log.info("continuing: %d of %d cases are predicted already in %s", int(done.sum()), len(inputs), out_dir)
    inputs = {case: files for (case, files), skip in zip(inputs.items(), done) if not skip}
  for files in inputs.values():  # a 2-D or unreadable file stops the run before any case, not midway
    for path in files:
      volumes.check_header(path)
  written = []
  from tqdm.auto import tqdm
  for case, files in tqdm(inputs.items(), desc="predict", unit="case",
                          disable=not progress or jax.process_index() != 0):
    image, spacing = nnunet.read_channels(files, names, layout)
    slices, bbox, _ = nnunet.prediction_slices(image, spacing, plans)
    mean_logits = lambda chunk: sum(logits_of(chunk) for _, _, logits_of in runs) / len(runs)
    prediction, probabilities = label_case(mean_logits, slices, bbox, image.shape[:3], plans, config.eval.batch_size,
                                           save_probabilities and jax.process_index() == 0)  # held where written
    prediction = segmentation.apply_postprocessing(prediction, steps)

    def write():
      if probabilities is not None:
        write_probabilities(os.path.join(out_dir, case), probabilities, files[0], layout, plans, bbox, reader)
      written.append(write_prediction(os.path.join(out_dir, case + ending_of[case]), prediction, files[0], layout))
    parallel.on_process_zero(f"write the prediction of {case}", write)
  return written


def _copy_nnunet_files(workdir, out_dir: str):
  """nnU-Net's plans.json and dataset.json of an imported run into `out_dir`, as its predictor
  leaves them there: nnUNetv2_ensemble reads them from its first input folder."""
  workdir, _, plans = read_segment_run(workdir)
  pre_dir = workdir / "preprocessed"
  if "imported_from" not in plans:
    log.info("%s: mfjax's run has no nnU-Net plans.json; list an nnU-Net prediction folder first in "
             "nnUNetv2_ensemble (it reads plans.json and dataset.json from its first folder). The "
             "probabilities are in SimpleITKIO's array order", out_dir)
    return
  if jax.process_index() != 0:
    return
  for name in NNUNET_FILES:
    source = pre_dir / f"nnunet_{name}"
    if not source.exists():
      source = Path(plans["imported_from"]["folder"]) / name
    if source.exists():
      (Path(out_dir) / name).write_text(source.read_text())
    else:
      log.warning("%s: not found (the run was imported before mfjax kept it); nnUNetv2_ensemble needs %s in "
                  "its first folder", source, name)
