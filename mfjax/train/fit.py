"""`mfjax train`: one cell of the benchmark, from config to result.json. Read top to bottom.

workdir/
  config.json       the resolved config (a restart with a different one is refused)
  metrics.jsonl     one JSON line per logged step and per validation
  events.*          TensorBoard events (tensorboardX; no TensorFlow needed)
  checkpoints/      latest train state + data iterator state, for resuming
  best/             parameters of the best validation epoch
  result.json       config, best epoch, validation and test metrics, timing
"""
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from mfjax import cpu_gemm
from mfjax import data as mdata
from mfjax import parallel
from mfjax.config import ConfigError, RunStopped, check_choice, to_dict
from mfjax.evals import metrics as mmetrics
from mfjax.models import heads, is_remote
from mfjax.train import build, lock, protocols
from mfjax.train.checkpoints import RunCheckpoints
from mfjax.train.optim import Plateau, make_optimizer, warmup_lr

log = logging.getLogger("mfjax")


class NonFiniteError(RunStopped):
  pass


# ------------------------------------------------------------------------------- setup


def workdir_path(workdir) -> epath.Path:
  """A local folder (made absolute) or a remote one (gs://...), for orbax and for our files."""
  text = str(workdir)
  return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))


def write_atomically(path, text: str) -> None:
  """Write a file whole or not at all, so a kill or a full disk never leaves a truncated
  config.json or result.json that a later run trusts: locally through a temporary file renamed
  over it; an object store writes whole objects anyway."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  partial = path.parent / f".{path.name}.partial-{os.getpid()}"
  try:
    partial.write_text(text)
    os.replace(partial, path)
  finally:
    if partial.exists():
      partial.unlink()


def check_workdir(workdir, config_dict: dict, changeable=()) -> None:
  """Write config.json, or check that a restarted run has the same config. A run that saved nothing
  yet (a start that failed on a wrong path, say) takes the new config; `changeable` (dotted names:
  fields that change how a run computes, not what) may differ at any restart."""
  workdir = workdir_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.json"
  if path.exists():
    saved = json.loads(path.read_text())
    as_it_ran(saved, config_dict, workdir)  # recorded as it ran (start_run set the run's config already)
    current = json.loads(json.dumps(config_dict))
    if saved == current:
      return
    saved = _same_paths_as(saved, current)
    diff = sorted(_diff(saved, current))
    if saved == current:  # the same files, named another way: recorded as named now
      pass
    elif _with_added(saved, current) == current:  # only fields a newer mfjax has: resumed with them
      log.warning("%s was started by an mfjax without config field(s) (%s); resuming with them", workdir,
                  "; ".join(diff))
    elif _with_fields_of(_with_added(saved, current), current, changeable) == current:
      log.info("%s resumes with %s (they change how the run computes, not what)", workdir, "; ".join(diff))
    elif not has_saved_work(workdir):
      log.warning("%s: replacing the config.json of a run that saved nothing (%s)", workdir, "; ".join(diff[:10]))
    else:
      raise ConfigError(f"{workdir} holds a run with a different config ({'; '.join(diff[:10])}). "
                        "Use a new --workdir, or the same config to resume.")
  if (workdir / "result.json").exists():  # a finished run, read (perhaps from a read-only folder): left as it is
    return
  # After every process has read the old config.json (start_run and the lines above read it).
  parallel.on_process_zero("write config.json", write_atomically, path,
                           json.dumps(config_dict, indent=2, sort_keys=True))


# Config fields that name files or folders: one given relative at the start and absolute at a resume
# (or the other way round, or with a trailing slash) is the same field.
PATH_FIELDS = (("data", "manual_dir"), ("data", "data_dir"), ("data", "feature_cache"), ("data", "raw"),
               ("data", "preprocessed"), ("model", "checkpoint"), ("head", "checkpoint"), ("gram", "checkpoint"),
               ("model", "init_from_run"))


def _same_paths_as(saved: dict, current: dict) -> dict:
  """`saved` with each path field that names the same local place as `current`'s (from this folder) taking
  `current`'s spelling."""
  local = lambda p: isinstance(p, str) and p and "://" not in p
  out = json.loads(json.dumps(saved))
  for section, field in PATH_FIELDS:
    old, new = saved.get(section, {}).get(field), current.get(section, {}).get(field)
    if old != new and local(old) and local(new) and (
        os.path.abspath(os.path.expanduser(old)) == os.path.abspath(os.path.expanduser(new))):
      out[section][field] = new
  return out


def check_recorded(workdir, name: str, current: dict, refusal, same=None, what: str = "") -> None:
  """Record `current` in WORKDIR/`name`, or check a restarted run against its record: a run that saved
  something and recorded otherwise (`same(recorded)` false; default: equal) raises ConfigError
  `refusal(recorded)`, decided by process 0 for every process; a run from before the record warns
  (naming `what`) and records."""
  workdir = workdir_path(workdir)
  path = workdir / name
  recorded = json.loads(path.read_text()) if path.exists() else None
  saved = has_saved_work(workdir)
  other = recorded is not None and saved and not (same(recorded) if same else recorded == current)
  if jax.process_count() > 1:  # every process raises, or none does
    from jax.experimental import multihost_utils
    other = bool(multihost_utils.broadcast_one_to_all(np.int32(other)))
  if other:
    raise ConfigError(refusal(recorded))
  if recorded == current:
    return
  if recorded is None and saved:
    log.warning("%s was started before mfjax recorded %s: it goes on with what it finds now, which cannot be "
                "checked against what it started on", workdir, what)
  parallel.on_process_zero(f"write {name}", write_atomically, path, json.dumps(current, indent=1, sort_keys=True))


def check_data_build(workdir, dataset) -> None:
  """A run belongs to the build of its dataset it started on (data_build.json): a run that saved
  something and meets another build (the dataset rebuilt in place) is refused, so that a resume or a
  finished result never mixes two datasets. The dataset's folder may move."""
  current = {"dataset": dataset.path, "build": dataset.fingerprint}
  check_recorded(workdir, "data_build.json", current, lambda recorded: (
      f"{workdir} was trained on another build of its dataset than {dataset.path} holds now (build "
      f"{recorded.get('build')}, now {current['build']}: rebuilt since). Its checkpoints and result belong to the "
      "old data: use a new --workdir, or delete this one to retrain"),
      same=lambda recorded: recorded.get("build") == current["build"], what="its dataset's build")


def has_saved_work(workdir) -> bool:
  """Whether a run folder holds anything a different config would invalidate: a checkpoint, a result
  or an exported backbone."""
  workdir = workdir_path(workdir)
  return ((workdir / "result.json").exists() or (workdir / "backbone").exists()
          or ((workdir / "backbones").exists() and any((workdir / "backbones").iterdir()))
          or any((workdir / sub).exists() and any(p.name.isdigit() for p in (workdir / sub).iterdir())
                 for sub in ("checkpoints", "best")))


def _with_added(saved, current):
  """`saved` with the keys only `current` has (fields added to the config since) filled in from it."""
  if not (isinstance(saved, dict) and isinstance(current, dict)):
    return saved
  return {**{k: v for k, v in current.items() if k not in saved},
          **{k: _with_added(v, current.get(k)) for k, v in saved.items()}}


def _with_fields_of(saved: dict, current: dict, fields) -> dict:
  """`saved` with the dotted `fields` that `current` has taken from it."""
  out = json.loads(json.dumps(saved))
  for field in fields:
    *sections, name = field.split(".")
    source, target = current, out
    for section in sections:
      source, target = source.get(section, {}), target.setdefault(section, {})
    if name in source:
      target[name] = source[name]
  return out


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield f"{prefix[:-1]}: {a!r} -> {b!r}"


def open_dataset(config) -> "mdata.Dataset":
  check_choice("dataset", config.data.name, sorted(mdata.DATASETS))
  if not config.data.manual_dir:
    raise ConfigError("data.manual_dir is empty: point it at the dataset's download folder")
  return mdata.build(config.data.name, config.data.manual_dir, config.data.data_dir,
                     **dict(config.data.options))


def loss_fn(logits, batch, multi_label: bool):
  if multi_label:
    losses = optax.sigmoid_binary_cross_entropy(logits, batch["label"])
    mask = batch.get("mask")
    if mask is not None:
      return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return losses.mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def kept_lines(path, resume_step: int) -> list[str]:
  """The lines of metrics.jsonl a run resumed at `resume_step` keeps: those up to its step, less a
  test record (a run killed between its test and result.json tests again), less a line a crash
  cut short or filled with NUL bytes (dropped with a warning)."""
  kept = []
  for number, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError):
      log.warning("%s, line %d: damaged (%r...); dropped", path, number, line[:60])
      continue
    if step <= resume_step and not any(k.startswith("test/") for k in record):
      kept.append(line + "\n")
  return kept


def summary_writer():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports an installed torch
  (1.5-2 s, ~600 MB) for a type hint only, and a JAX run writes plain floats."""
  masked = "torch" not in sys.modules
  if masked:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
  try:
    from tensorboardX import SummaryWriter
  finally:
    if masked:
      del sys.modules["torch"]
  return SummaryWriter


class Writer:
  """metrics.jsonl (+ TensorBoard events for local workdirs) on process 0.

  Locally each line is appended at once. A remote workdir (gs://) cannot be appended to, so
  lines are buffered and the file is rewritten at every `flush` (checkpoints, epochs, the end).
  """

  def __init__(self, workdir, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.remote = is_remote(workdir)
    self.lines, self.tb = [], None
    if not self.enabled:
      return
    # A resumed run rewrites what came after its checkpoint, so the log equals an uninterrupted one.
    if self.path.exists():
      self.lines = kept_lines(self.path, resume_step)
      write_atomically(self.path, "".join(self.lines))
    if self.remote:
      log.warning("workdir %s is remote: TensorBoard events are not written (metrics.jsonl is)", workdir)
    else:
      # Events past the checkpoint, from the attempt that stopped, are dropped as metrics.jsonl's lines are.
      self.tb = summary_writer()(str(workdir), purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **values}) + "\n"
    self.lines.append(line)
    if not self.remote:
      with self.path.open("a") as f:
        f.write(line)
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
          self.tb.add_scalar(k, v, step)

  def flush(self) -> None:
    if self.enabled and self.remote:
      write_atomically(self.path, "".join(self.lines))

  def close(self):
    self.flush()
    if self.tb is not None:
      self.tb.close()


# ------------------------------------------------------------------------------- train


@dataclasses.dataclass
class Setup:
  """Everything a run needs before its loop: data, mesh, model, sharded state, jitted functions."""
  dataset: Any
  spec: Any
  mesh: Any
  classifier: Any
  state: dict
  train_step: Callable
  evaluate: Callable          # evaluate(split, params_state) -> metrics dict
  train_loader: Callable      # train_loader(num_epochs) -> resumable iterable of local batches
  steps_per_epoch: int
  n_total: int
  n_trainable: int
  cached_features: bool


def uses_feature_cache(config) -> bool:
  """Frozen linear probing without augmentation: the foundation runs once per example."""
  return config.protocol.name == "frozen_linear" and not config.data.augment and config.data.cache_features


def frozen_foundation(config, num_classes: int, init_rng):
  """(module, variables) of the foundation exactly as the full classifier would hold it: the
  converted checkpoint, or the classifier's own random init (same rng, same values)."""
  from mfjax.evals import studies
  if config.model.checkpoint:
    return studies.foundation(config)
  classifier = build.build_classifier(config, num_classes)
  images = jnp.zeros((1, config.data.resolution, config.data.resolution, 3), jnp.float32)
  variables = jax.jit(classifier.init)(init_rng, images)
  return classifier.foundation, {c: tree["foundation"] for c, tree in variables.items() if "foundation" in tree}


def cached_features(config, dataset, mesh, init_rng) -> dict:
  """{split: {"image": pooled features, "label"[, "mask"]}} from the feature cache (or computed)."""
  from mfjax.evals import knn as knn_lib, studies
  cache = knn_lib.FeatureCache(config.data.feature_cache)
  net = []
  out = {}
  for split in ("train", "validation", "test"):
    key = studies.feature_key(config, dataset, split, "classifier")

    def compute():
      if not net:
        net.extend(frozen_foundation(config, dataset.spec.num_classes, init_rng))
      log.info("caching %s features of %s/%s", key["model"], dataset.spec.name, split)
      return studies.extract_pooled(net[0], net[1], config, dataset, split, mesh)

    arrays = cache.get_or_compute(key, compute)
    out[split] = {"image": arrays["features"], "label": arrays["labels"],
                  **({"mask": arrays["mask"]} if "mask" in arrays else {})}
  return out


def prepare(config, dataset=None) -> Setup:
  """Data (`dataset` when the caller opened it already), mesh, classifier and its train state placed
  on the mesh shapes-first, and the steps."""
  build.check_names(config)
  build.use_matmul_precision(config)
  dataset = dataset or open_dataset(config)
  spec = dataset.spec
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  if config.batch_size % mesh.devices.size:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {mesh.devices.size} devices")
  steps_per_epoch = mdata.steps_per_epoch(dataset.split_sizes["train"], config.batch_size)
  loader_args = dict(resolution=config.data.resolution, uncertainty=config.data.uncertainty,
                     worker_count=config.data.num_workers, norm=build.input_norm(config),
                     sharding=parallel.batch_sharding(mesh))
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  cached = uses_feature_cache(config)
  if cached:
    features = cached_features(config, dataset, mesh, init_rng)
    classifier = heads.LinearProbe(spec.num_classes)
    input_shape = features["train"]["image"].shape[1:]
    train_loader = lambda epochs: mdata.make_array_loader(
        features["train"], batch_size=config.batch_size, train=True, seed=config.seed, num_epochs=epochs,
        sharding=parallel.batch_sharding(mesh))
    eval_loader = lambda split: mdata.make_array_loader(features[split], batch_size=config.batch_size, train=False,
                                                        sharding=parallel.batch_sharding(mesh))
  else:
    classifier = build.build_classifier(config, spec.num_classes)
    input_shape = (config.data.resolution, config.data.resolution, 3)
    train_loader = lambda epochs: mdata.make_loader(
        dataset, "train", batch_size=config.batch_size, train=True, seed=config.seed, num_epochs=epochs,
        augment=config.data.augment, **loader_args)
    eval_loader = lambda split: mdata.make_eval_loader(dataset, split, batch_size=config.batch_size, **loader_args)

  # Model, parameters and optimizer, placed on the mesh shapes-first.
  protocol = config.protocol.name
  foundation_train = protocols.foundation_trains(protocol, config.protocol.decapitation_trained)
  abstract = build.abstract_params(classifier, input_shape)
  mask = protocols.trainable_mask(abstract["params"], protocol, config.protocol.unfreeze_from,
                                  config.protocol.decapitation_trained, config.model.get("freeze_unused", True))
  rules = [tuple(r) for r in config.sharding_rules]
  min_bytes = int(config.min_fsdp_mb * (1 << 20))
  var_shardings = parallel.tree_shardings(abstract, rules, mesh, min_bytes)
  inputs0 = jnp.zeros((1, *input_shape), jnp.float32)
  variables = jax.jit(classifier.init, out_shardings=var_shardings)(init_rng, inputs0)
  variables = build.load_pretrained(classifier, config, variables)
  trainable, frozen = protocols.split(variables["params"], mask)
  tx = make_optimizer(trainable, config.optim.clip_norm, config.optim.weight_decay, config.optim.b1,
                      config.optim.b2, config.optim.eps, config.optim.mu_dtype or None,
                      one_dim_in_torch=build.one_dim_in_torch(config))
  opt_shardings = parallel.optimizer_shardings(tx, jax.eval_shape(tx.init, trainable),
                                               jax.tree_util.tree_map(lambda x: x.sharding, trainable), mesh)
  replicated = parallel.replicated(mesh)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           "rng": jax.device_put(train_rng, replicated),
           "trainable": trainable, "frozen": frozen, "batch_stats": variables.get("batch_stats", {}),
           "opt": jax.jit(tx.init, out_shardings=opt_shardings)(trainable)}
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  n_trainable = protocols.count_used(trainable)
  n_total = n_trainable + protocols.count_used(frozen)
  if cached:  # the probe on cached features holds no foundation: count the classifier it stands for
    full = build.abstract_params(build.build_classifier(config, spec.num_classes),
                                 (config.data.resolution, config.data.resolution, 3))
    n_total = protocols.count_used(full["params"])

  def apply(params, stats, images, train, rng=None):
    v = {"params": params, **({"batch_stats": stats} if stats else {})}
    if train and stats and foundation_train:
      out, updates = classifier.apply(v, images, train=True, foundation_train=True,
                                      rngs={"dropout": rng}, mutable=["batch_stats"])
      return out, updates["batch_stats"]
    out = classifier.apply(v, images, train=train, foundation_train=foundation_train and train,
                           rngs={"dropout": rng} if train else None)
    return out, stats

  def train_step(state, batch, lr):
    step_rng = jax.random.fold_in(state["rng"], state["step"])

    def loss_of(trainable):
      params = protocols.merge(trainable, state["frozen"])
      out, stats = apply(params, state["batch_stats"], batch["image"], True, step_rng)
      return loss_fn(out["logits"], batch, spec.multi_label), stats

    (loss, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state["trainable"])
    updates, opt = tx.update(grads, state["opt"], state["trainable"])
    updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
    new = dict(state, step=state["step"] + 1, trainable=optax.apply_updates(state["trainable"], updates),
               opt=opt, batch_stats=stats)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  batch_sharding = parallel.batch_sharding(mesh)

  @jax.jit
  def predict(trainable, frozen, stats, images):
    out, _ = apply(protocols.merge(trainable, frozen), stats, images, False)
    return out["logits"]

  def evaluate(split: str, params_state) -> dict:
    loader = eval_loader(split)
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    logits, labels, masks, valid = [], [], [], []
    for batch in loader:
      arrays = mdata.global_batch(batch, batch_sharding)
      out = predict(params_state["trainable"], params_state["frozen"], params_state["batch_stats"],
                    arrays["image"])
      logits.append(gather(out))
      labels.append(gather(arrays["label"]))
      valid.append(gather(arrays["valid"]))
      if "mask" in arrays:
        masks.append(gather(arrays["mask"]))
    return mmetrics.evaluate(np.concatenate(logits), np.concatenate(labels), multi_label=spec.multi_label,
                             headline=spec.headline_metric, mask=np.concatenate(masks) if masks else None,
                             valid=np.concatenate(valid))

  return Setup(dataset, spec, mesh, classifier, state,
               jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_shardings, replicated)),
               evaluate, train_loader, steps_per_epoch, int(n_total), int(n_trainable), cached)


def abstract_of(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


PARAM_KEYS = ("trainable", "frozen", "batch_stats")


def quiet_libraries() -> None:
  """Orbax and tfds log every save and load through absl (tfds warns about every custom config);
  keep the console readable."""
  import absl.logging
  absl.logging.set_verbosity(absl.logging.ERROR)


# Config fields added since runs were started whose default does something the older mfjax did
# not: (the value that matches what it did, whether the field changes what a given run does). A run
# started without the field goes on with that value where it matters.
BEFORE_THE_FIELD = {
    ("model", "resize_at_load"): (False, build.resized_at_load),
    # A SAM run whose foundation trained has its neck in the trained state (and Adam's) of its checkpoints.
    ("model", "freeze_unused"): (False, lambda c: c.model.name.startswith("sam_") and protocols.foundation_trains(
        c.protocol.name, c.protocol.get("decapitation_trained", False))),
    # The plateau rule counted the epochs of the warmup too.
    ("optim", "plateau_after_warmup"): (False, lambda c: c.optim.plateau_patience >= 0 and bool(
        c.optim.warmup_epochs or c.optim.warmup_steps)),
    # Pretraining collated its iBOT masks over the whole batch, one group (on every device count).
    ("masking", "group_crops"): (lambda c: 2 * c.batch_size, lambda c: True),
    # float32 matmuls ran at XLA's default precision: TF32 on a GPU, bfloat16 passes on a TPU.
    ("model", "matmul_precision"): ("default", lambda c: jax.default_backend() != "cpu"),
}


def as_it_ran(saved: dict, config, workdir) -> None:
  """Set in `config` (a ConfigDict or a dict) the BEFORE_THE_FIELD values of the fields the run's
  saved config lacks, where they change what the run does."""
  import ml_collections
  view = ml_collections.ConfigDict(to_dict(config))
  for (section, field), (value, matters) in BEFORE_THE_FIELD.items():
    if field in saved.get(section, {}) or section not in config:
      continue
    value = value(view) if callable(value) else value
    if config[section].get(field, value) != value and _matters(matters, view):
      log.warning("%s was started before %s.%s existed: it goes on with %s.%s=%s, as it ran", workdir, section,
                  field, section, field, value)
      config[section][field] = value


def _matters(predicate, config) -> bool:
  try:
    return bool(predicate(config))
  except Exception:  # noqa: BLE001 - e.g. a checkpoint not on this machine: keep what the run did
    return True


def holds_workdir(train_fn):
  """`train_fn(config, workdir, ...)` run holding the workdir's lock (mfjax.train.lock): one job at a time."""
  @functools.wraps(train_fn)
  def locked(config, workdir, *args, **kwargs):
    parallel.maybe_initialize_distributed()  # before process_index
    if (workdir_path(workdir) / "result.json").exists():  # finished: only read (from a read-only folder too)
      return train_fn(config, workdir, *args, **kwargs)
    with lock.holding(workdir_path(workdir)):
      try:
        return train_fn(config, workdir, *args, **kwargs)
      except BaseException:
        try:
          RunCheckpoints.close_owned(workdir_path(workdir))
        except Exception:  # noqa: BLE001 - e.g. a failed save re-raised: the run's own error is the one to see
          log.debug("closing the checkpoints of %s after an error", workdir, exc_info=True)
        raise
  return locked


def start_run(config, workdir, changeable=()) -> tuple[epath.Path, dict]:
  """The start of every training command: quiet library logs, multi-host initialisation, and the
  workdir with its config.json written (or checked against a restarted run's, `check_workdir`).
  (workdir, config dict)."""
  quiet_libraries()
  workdir = workdir_path(workdir)
  saved = workdir / "config.json"
  if saved.exists():
    as_it_ran(json.loads(saved.read_text()), config, workdir)
  config_dict = to_dict(config)
  parallel.maybe_initialize_distributed()
  check_workdir(workdir, config_dict, changeable)
  return workdir, config_dict


def check_paper_defaults(config) -> None:
  """configs/paper.py sets the warmup and SEEM's drop-path from its `dataset=`, `model=` and
  `protocol=` arguments; a `--config.data.name` (or model/protocol) override does not change them.
  Warn where the value is the paper's for another cell; refuse two warmups."""
  from configs.paper import WARMUP, paper_drop_path
  warmup = {"epochs": config.optim.get("warmup_epochs", 0), "steps": config.optim.get("warmup_steps", 0)}
  if warmup["epochs"] and warmup["steps"]:
    raise ConfigError(f"optim.warmup_epochs={warmup['epochs']} and optim.warmup_steps={warmup['steps']}: set one "
                      "and the other to 0")
  paper = {name: {"epochs": w.get("epochs", 0), "steps": w.get("steps", 0)} for name, w in WARMUP.items()}
  if config.data.name in paper and warmup != paper[config.data.name] and warmup in paper.values():
    others = [name for name, w in paper.items() if w == warmup]
    log.warning("the warmup (%s) is the paper's for %s, not for %s (%s): pass dataset=%s in the config argument, "
                "or set optim.warmup_epochs / optim.warmup_steps", warmup, "/".join(others), config.data.name,
                paper[config.data.name], config.data.name)
  if "protocol" not in config:
    return
  drop_path, wanted = config.model.drop_path, paper_drop_path(config.model.name, config.protocol.name)
  if drop_path != wanted and drop_path in (0.0, paper_drop_path("seem_focalt", "unfrozen_linear")):
    log.warning("model.drop_path=%s, the paper's is %s for %s under %s: pass model= and protocol= in the config "
                "argument, or set model.drop_path", drop_path, wanted, config.model.name, config.protocol.name)


def next_surviving_workers(iterator, loader, preemption) -> tuple[Any, Any]:
  """(iterator, its next batch). Data worker processes that a SIGTERM to the whole process group
  killed (SLURM, `kill -TERM -PGID`) are started again at the iterator's position, so the run
  reaches the step where it saves; any other failure is raised."""
  try:
    return iterator, next(iterator)
  except RuntimeError:
    if not preemption.received:
      raise
    position = iterator.get_state()
    iterator = iter(loader)
    iterator.set_state(position)
    log.warning("%s stopped the data workers; started them again to reach the checkpoint", preemption.signal_name)
    return iterator, next(iterator)


@holds_workdir
def train(config, workdir: str, progress: bool = True, record_divergence: bool = False) -> dict:
  """One run to result.json. A non-finite loss raises NonFiniteError; with `record_divergence` (sweeps)
  it writes a result.json with status "diverged" and no scores instead, so that the grid goes on and
  the learning rate is not selected."""
  start_time = time.time()
  build.check_names(config)
  check_paper_defaults(config)
  workdir, config_dict = start_run(config, workdir)
  finished = workdir / "result.json"
  if finished.exists():  # its config is this one (start_run checked): nothing to do, nothing appended
    log.info("%s has finished already (result.json); delete it to test the best checkpoint again", workdir)
    return json.loads(finished.read_text())
  dataset = open_dataset(config)
  check_data_build(workdir, dataset)
  resized = build.resized_at_load(config)
  checkpoints = build.checkpoint_models(config)
  run = prepare(config, dataset)
  dataset, spec, state, steps_per_epoch = run.dataset, run.spec, run.state, run.steps_per_epoch
  protocol = config.protocol.name
  total_steps = steps_per_epoch * config.epochs
  log.info("%s / %s / %s: %.1fM parameters, %.1fM trained; mesh %s; %d steps/epoch",
           config.model.name, spec.name, protocol, run.n_total / 1e6, run.n_trainable / 1e6,
           dict(run.mesh.shape), steps_per_epoch)
  if jax.default_backend() == "cpu":
    log.info("CPU GEMMs: %s", cpu_gemm.describe(config.model.dtype))
  train_loader = run.train_loader(config.epochs)
  batch_sharding = parallel.batch_sharding(run.mesh)
  train_step, evaluate = run.train_step, run.evaluate

  # Resume.
  ckpts = RunCheckpoints(workdir, owner=True)  # holds the lock
  host = {"epoch": 0, "plateau": {}, "best_metric": None, "best_epoch": None, "best_step": None,
          "data": None, "train_seconds": 0.0}
  iterator = iter(train_loader)
  restored = ckpts.restore_latest(abstract_of(state))
  if restored is not None:
    state, host = restored
    iterator.set_state(json.loads(host["data"]))
    log.info("resumed %s at step %d (epoch %d)", workdir, int(state["step"]), host["epoch"])
  # Best checkpoints after the resumed step (all of them on a fresh start) are a killed attempt's.
  ckpts.drop_best_after(int(state["step"]))
  plateau = Plateau(config.optim.plateau_patience, config.optim.plateau_factor, lr=config.optim.lr, **host["plateau"])
  step = int(state["step"])
  writer = Writer(workdir, step)
  warmup_steps = config.optim.warmup_steps or config.optim.warmup_epochs * steps_per_epoch

  def host_state(epoch):
    return dict(host, epoch=epoch, data=json.dumps(iterator.get_state()),
                plateau={"scale": plateau.scale, "best": plateau.best, "bad_epochs": plateau.bad_epochs},
                train_seconds=host["train_seconds"] + time.time() - segment_start)

  preemption = parallel.Preemption().start()
  segment_start = time.time()
  validated = False

  def next_batch():
    nonlocal iterator
    iterator, batch = next_surviving_workers(iterator, train_loader, preemption)
    return batch

  # The loop: epochs of steps, validation after each epoch, best checkpoint by validation metric.
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               desc=f"{config.model.name}/{spec.name}/{protocol}")
  try:
    pending = None  # the previous step's metrics, read one step late to keep the device busy
    t_log, n_log = time.time(), 0
    while step < total_steps:
      epoch = step // steps_per_epoch
      batch = mdata.global_batch(next_batch(), batch_sharding)
      lr = warmup_lr(step, config.optim.lr, warmup_steps, config.optim.warmup_start) * plateau.scale
      state, metrics = train_step(state, batch, jnp.float32(lr))
      if pending is not None:
        _check_and_log(pending, writer, config, bar)
      pending = (step, lr, metrics)
      step += 1
      n_log += 1
      preempted = preemption.due(step)  # decided by all processes together
      if bar is not None:
        bar.update(1)
      if step % config.log_every_steps == 0:
        elapsed = time.time() - t_log
        if bar is not None:
          bar.set_postfix(img_s=f"{n_log * config.batch_size / max(elapsed, 1e-9):.1f}", lr=f"{lr:.2e}")
        t_log, n_log = time.time(), 0
      end_of_epoch = step % steps_per_epoch == 0
      checkpoint_due = end_of_epoch or step % config.checkpoint_every_steps == 0
      if pending is not None and (checkpoint_due or preempted):  # checked before the state is saved
        _check_and_log(pending, writer, config, bar, force=checkpoint_due)  # a preemption logs on cadence only
        pending = None
      if end_of_epoch:
        val = evaluate("validation", state)
        validated = True
        reduced = plateau.update(val["headline"], in_warmup=config.optim.plateau_after_warmup and step <= warmup_steps)
        writer.write(step, {"epoch": epoch + 1, **{f"val/{k}": v for k, v in val.items()},
                            "lr_reduced": reduced})
        # Like the paper: the first epoch reaching the best (rounded to 3 decimals) wins.
        score = None if val["headline"] is None or not np.isfinite(val["headline"]) else round(val["headline"], 3)
        if score is not None and (host["best_metric"] is None or score > host["best_metric"]):
          host.update(best_metric=score, best_epoch=epoch + 1, best_step=step, best_val=val)
          ckpts.save_best(step, {k: state[k] for k in PARAM_KEYS},
                          {"epoch": epoch + 1, "val": val})
        if bar is not None:
          bar.write(f"epoch {epoch + 1}/{config.epochs}: val {spec.headline_metric} "
                    f"{val['headline']:.4f} (best {host['best_metric']} @ {host['best_epoch']})")
      if checkpoint_due or preempted:
        writer.flush()  # first: a resume truncates lines past its checkpoint, but cannot restore missing ones
        ckpts.save_latest(step, state, host_state(step // steps_per_epoch))
        ckpts.keep_best_only(host["best_step"])
      if preempted:
        return preemption.stopped(step)
    if pending is not None:
      _check_and_log(pending, writer, config, bar, force=True)
  except NonFiniteError as e:
    if not record_divergence:
      writer.close()  # the loss lines that led to it reach a remote metrics.jsonl
      raise
    log.warning("%s diverged: %s", workdir, e)
    result = {"status": "diverged", "error": str(e), "config": config_dict, "model": config.model.name,
              "dataset": spec.name, "protocol": protocol, "headline_metric": spec.headline_metric,
              "val": {"headline": None}, "test": {"headline": None}, "resized_at_load": resized,
              "checkpoints": checkpoints}
    writer.close()
    ckpts.close()
    parallel.on_process_zero("write result.json", write_atomically, workdir / "result.json",
                             json.dumps(result, indent=2, sort_keys=True))
    return result
  finally:
    preemption.stop()
    if bar is not None:
      bar.close()

  # Test with the best checkpoint.
  train_seconds = host_state(config.epochs)["train_seconds"]
  best = ckpts.restore_best(abstract_of({k: state[k] for k in PARAM_KEYS}), host["best_step"])
  if best is None and host["best_step"] is not None:
    raise RuntimeError(f"{workdir}/best/{host['best_step']}, the best checkpoint the latest checkpoint records, "
                       "is missing: the run cannot be tested")
  if best is None:
    raise RuntimeError(f"no validation epoch gave a finite {spec.headline_metric}: no best checkpoint to test")
  best_params, best_host = best
  if not validated:  # a restart after the last step: the prediction step compiles here, not in the timing
    evaluate("validation", best_params)
  t0 = time.time()
  test = evaluate("test", best_params)
  test_seconds = time.time() - t0
  result = {"config": config_dict, "model": config.model.name, "dataset": spec.name, "protocol": protocol,
            "headline_metric": spec.headline_metric, "best_epoch": best_host["epoch"],
            "iterations_to_best": host["best_step"], "val": best_host["val"], "test": test,
            "params_total": run.n_total, "params_trained": run.n_trainable,
            "resized_at_load": resized, "checkpoints": checkpoints,
            "train_seconds": train_seconds, "test_seconds": test_seconds,
            # On cached features the test times a linear layer, not the model: no throughput to report.
            "test_images_per_second": (None if run.cached_features
                                       else dataset.split_sizes["test"] / max(test_seconds, 1e-9)),
            "cached_features": bool(run.cached_features),
            "wall_seconds": time.time() - start_time, "devices": int(run.mesh.devices.size),
            "device_kind": jax.devices()[0].device_kind}
  writer.write(step, {f"test/{k}": v for k, v in test.items()})
  writer.close()
  ckpts.close()
  parallel.on_process_zero("write result.json", write_atomically, workdir / "result.json",
                           json.dumps(result, indent=2, sort_keys=True, default=float))
  return result


def _check_and_log(pending, writer, config, bar, force=False):
  step, lr, metrics = pending
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    raise NonFiniteError(f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopping. "
                         "The last good checkpoint is kept in the workdir; lower optim.lr or check the data.")
  if force or (step + 1) % config.log_every_steps == 0:
    writer.write(step + 1, {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr})


def read_run_config(workdir) -> tuple[epath.Path, Any]:
  """(workdir, its config) of a started run, for commands that reuse it (eval, predict)."""
  import ml_collections
  quiet_libraries()
  workdir = workdir_path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise ConfigError(f"{workdir} has no config.json: not an mfjax run folder")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  for (section, field), (value, matters) in BEFORE_THE_FIELD.items():  # rebuilt as it ran
    if section in config and field not in config[section] and _matters(matters, config):
      config[section][field] = value(config) if callable(value) else value
  return workdir, config


def evaluate_run(workdir: str, split: str = "test") -> dict:
  """`mfjax eval`: rebuild a finished (or running) run from its config and score its best checkpoint."""
  workdir, config = read_run_config(workdir)
  if "protocol" not in config:
    raise ConfigError(f"{workdir} is not an `mfjax train` run: a segmentation run is scored in its result.json "
                      "(and predicts with `mfjax segment --predict`), a pretraining run has no evaluation")
  parallel.maybe_initialize_distributed()  # under a multi-process launcher the processes share the split
  run = prepare(config)
  best = RunCheckpoints(workdir).restore_best(abstract_of({k: run.state[k] for k in PARAM_KEYS}))
  if best is None:
    raise ConfigError(f"{workdir} has no best checkpoint yet (no validation epoch finished)")
  params, host = best
  metrics = run.evaluate(split, params)
  out = {"workdir": str(workdir), "split": split, "best_epoch": host["epoch"], "metrics": metrics}
  parallel.on_process_zero(f"write eval_{split}.json", (workdir / f"eval_{split}.json").write_text,
                           json.dumps(out, indent=2, default=float))
  return out
