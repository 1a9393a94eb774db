"""`mfjax knn` and `mfjax cka`: features from models over a dataset split, then k-NN or CKA.

k-NN (the paper's `knn_predict`): the foundation's `pooled` feature of the training split under
eval transforms is the bank, the test split the queries; features are cached per (model,
checkpoint, dataset, split, resolution, transform), so a k sweep runs the model once.

CKA: every block's (stage's) output, mean-pooled over tokens, of
  layers      the foundation before fine-tuning vs after (a run's initial and best parameters),
  stacked     the stacked DeiT-B classifier before vs after (runs with a DeiT-B head),
  foundations the last block of several foundations on the same images,
accumulated over the whole split with the minibatch (unbiased HSIC) estimator.
"""
import json
import logging

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mfjax import data as mdata
from mfjax import models, parallel
from mfjax.config import ConfigError
from mfjax.evals import cka as cka_lib
from mfjax.evals import knn as knn_lib
from mfjax.train import build, protocols

log = logging.getLogger("mfjax")


def pool_tokens(x):
  """(B, ..., D) -> (B, D): the mean over every token/spatial axis."""
  return x.mean(axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def foundation(config):
  """(module, variables) of the config's foundation: converted weights, or random (seeded)."""
  name, overrides = build.foundation_spec(config)
  module = models.create(name, **overrides)
  if config.model.checkpoint:
    return module, build.pretrained_foundation(config)
  log.warning("model.checkpoint is empty: features of a randomly initialised %s", name)
  res = config.data.resolution
  return module, models.init_params(module, jax.random.PRNGKey(config.seed), (res, res))


def batches(config, dataset, split: str, mesh, max_examples: int | None = None, batch_size: int | None = None):
  """Global eval batches of `split` (every example once) with this process's rows assembled."""
  sharding = parallel.batch_sharding(mesh)
  batch_size = batch_size or config.batch_size
  loader = mdata.make_eval_loader(dataset, split, batch_size=batch_size, resolution=config.data.resolution,
                                  uncertainty=config.data.uncertainty, norm=build.input_norm(config),
                                  sharding=sharding)
  from tqdm.auto import tqdm
  examples = min(dataset.split_sizes[split], max_examples or dataset.split_sizes[split])
  seen = 0
  with tqdm(total=-(-examples // batch_size), unit="batch", desc=f"{config.model.name} on {split}",
            disable=jax.process_index() != 0, dynamic_ncols=True, leave=False) as bar:
    for batch in loader:
      yield mdata.global_batch(batch, sharding)
      bar.update(1)
      seen += batch_size
      if max_examples and seen >= max_examples:
        return


def cka_batches(config, dataset, split: str, mesh, max_examples: int | None = None, batch_size: int | None = None):
  """(batch, valid rows) of `split` for a minibatch CKA. Every batch counts equally in its
  estimate, so a last batch with under half a batch of real examples is left out (and logged)."""
  used = left_out = 0
  batch_size = batch_size or config.batch_size
  for arrays in batches(config, dataset, split, mesh, max_examples, batch_size):
    valid = gather(arrays["valid"])
    count = int(valid.sum())
    if count < max(4, batch_size // 2) and used:
      left_out += count
      continue
    if count < 4:  # the unbiased HSIC needs 4 examples
      raise ValueError(f"CKA needs batches of at least 4 examples; the {split} split gave {count}")
    used += count
    yield arrays, valid
  if left_out:
    log.info("CKA: left out the last %d example(s) of %s, a partial batch that would weigh as much as a "
             "full one (%d examples used)", left_out, split, used)


def feature_key(config, dataset, split: str, random_init: str) -> dict:
  """What a cached feature array depends on: model, weights, dataset, split, resolution, transform.
  `random_init` names how a foundation without a checkpoint was initialised (the classifier's
  initialisation in `frozen_linear`, the bare model's in k-NN and CKA): their weights differ."""
  name, overrides = build.foundation_spec(config)
  checkpoint = config.model.checkpoint
  return {"model": name, "overrides": overrides, "dataset": dataset.path, "build": dataset.fingerprint,
          "split": split,
          "checkpoint": knn_lib.fingerprint(checkpoint) if checkpoint else f"random:{random_init}:{config.seed}",
          "resolution": config.data.resolution,
          "transform": f"eval,uncertainty={config.data.uncertainty},norm={build.input_norm(config)}"}


def gather(x) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def extract_pooled(module, variables, config, dataset, split, mesh) -> dict:
  """{"features", "labels"[, "mask"]} of every valid example of `split`."""
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False)["pooled"])
  out = {"features": [], "labels": [], "mask": [], "valid": []}
  for arrays in batches(config, dataset, split, mesh):
    out["features"].append(gather(apply(variables, arrays["image"])))
    out["labels"].append(gather(arrays["label"]))
    out["valid"].append(gather(arrays["valid"]))
    if "mask" in arrays:
      out["mask"].append(gather(arrays["mask"]))
  valid = np.concatenate(out.pop("valid"))
  return {k: np.concatenate(v)[valid] for k, v in out.items() if v}


def knn(config, out_dir: str, ks=(10, 20, 50, 100, 200), cache_dir: str = "~/.cache/mfjax/features",
        temperature: float = knn_lib.TEMPERATURE) -> dict:
  from mfjax.train import fit
  parallel.maybe_initialize_distributed()  # under a multi-process launcher the processes share the work
  build.check_names(config)
  if not temperature > 0:
    raise ConfigError(f"k-NN temperature={temperature} must be > 0")
  dataset = fit.open_dataset(config)
  bank = dataset.split_sizes["train"]
  too_many = [k for k in ks if not 1 <= k <= bank]
  if too_many:  # checked before any feature is computed
    raise ConfigError(f"k-NN: k={too_many} must be between 1 and the {bank} training examples (the bank) of "
                      f"{dataset.path}")
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  cache = knn_lib.FeatureCache(cache_dir)
  module = variables = None
  features = {}
  for split in ("train", "test"):
    key = feature_key(config, dataset, split, "model")

    def compute():
      nonlocal module, variables
      if module is None:
        module, variables = foundation(config)
      return extract_pooled(module, variables, config, dataset, split, mesh)

    features[split] = cache.get_or_compute(key, compute)
  spec = dataset.spec
  results = knn_lib.knn_evaluate(features["train"]["features"], features["train"]["labels"],
                                 features["test"]["features"], features["test"]["labels"], ks=ks,
                                 temperature=temperature, num_classes=spec.num_classes,
                                 multi_label=spec.multi_label, headline=spec.headline_metric,
                                 mask=features["test"].get("mask"))
  out = knn_lib.result_json(model=config.model.name, dataset=spec.name, resolution=config.data.resolution,
                            headline_metric=spec.headline_metric, results=results, temperature=temperature,
                            checkpoint=config.model.checkpoint, overrides=dict(config.model.overrides),
                            checkpoints=build.checkpoint_models(config, head=False),
                            data={"options": dict(config.data.options), "uncertainty": config.data.uncertainty})
  if jax.process_index() == 0:  # out_dir may be remote (gs://), like a workdir
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(out_dir) / "knn.json").write_text(json.dumps(out, indent=2, default=float))
  return out


def cka_run(workdir: str, split: str = "test", max_examples: int | None = None) -> list[str]:
  """CKA of a trained run: foundation (and stacked head) before vs after fine-tuning."""
  from mfjax.train import fit
  parallel.maybe_initialize_distributed()
  _, config = fit.read_run_config(workdir)
  if "protocol" not in config:
    raise ConfigError(f"{workdir} is not an `mfjax train` run (a segmentation or pretraining run): CKA before "
                      "and after fine-tuning compares a classifier's foundation")
  if fit.uses_feature_cache(config):
    raise ConfigError(f"{workdir} trained a linear probe on cached features: its foundation is frozen and was "
                      "never part of the trained model, so there is nothing to compare before and after")
  run = fit.prepare(config)  # its initial state holds the pretrained (or seeded random) weights
  best = fit.RunCheckpoints(fit.workdir_path(workdir)).restore_best(
      fit.abstract_of({k: run.state[k] for k in fit.PARAM_KEYS}))
  if best is None:
    raise ConfigError(f"{workdir} has no best checkpoint: train it first")
  after, _ = best
  before = {k: run.state[k] for k in fit.PARAM_KEYS}

  def blocks(params_state, images):
    params = protocols.merge(params_state["trainable"], params_state["frozen"])
    v = {"params": params, **({"batch_stats": params_state["batch_stats"]} if params_state["batch_stats"] else {})}
    out = run.classifier.apply(v, images, train=False, return_blocks=True)
    return ([pool_tokens(b) for b in out["foundation_blocks"]], [pool_tokens(b) for b in out.get("head_blocks", [])])

  blocks = jax.jit(blocks)
  layer_cka, head_cka = cka_lib.MinibatchCKA(), cka_lib.MinibatchCKA()
  has_head = False
  for arrays, valid in cka_batches(config, run.dataset, split, run.mesh, max_examples):
    fa, ha = blocks(before, arrays["image"])
    fb, hb = blocks(after, arrays["image"])
    pick = lambda xs: [gather(x)[valid] for x in xs]
    layer_cka.update(pick(fa), pick(fb))
    if ha:
      has_head = True
      head_cka.update(pick(ha), pick(hb))
  written = []
  name = config.model.name
  start = "pretrained" if config.model.checkpoint else "at random init"
  results = [("layers", layer_cka, f"{name} {start}", f"{name} fine-tuned")]
  if has_head:
    results.append(("stacked", head_cka, "DeiT-B head before", "DeiT-B head after"))
  for kind, acc, row_label, col_label in results:
    matrix = acc.result()
    labels = [f"block {i}" for i in range(matrix.shape[0])]
    out = cka_lib.result_json(kind, labels, labels, matrix, model=name, dataset=run.spec.name,
                              protocol=config.protocol.name, split=split, row_axis=row_label,
                              col_axis=col_label, num_examples=acc.num_examples,
                              title=f"CKA, {name} on {run.spec.name} ({config.protocol.name})")
    path = fit.workdir_path(workdir) / f"cka_{kind}.json"
    parallel.on_process_zero(f"write {path}", path.write_text, json.dumps(out, indent=2, default=float))
    written.append(str(path))
  return written


def cka_foundations(configs: list, out_dir: str, split: str = "test", max_examples: int | None = None) -> str:
  """Last-block CKA between foundations (Fig. 8); all configs must name the same dataset."""
  parallel.maybe_initialize_distributed()
  datasets = {(c.data.name, c.data.manual_dir) for c in configs}
  if len(datasets) != 1:
    raise ValueError(f"cka --foundations compares models on one dataset; got {sorted(datasets)}")
  for c in configs:
    build.check_names(c)
  config = configs[0]
  from mfjax.train import fit
  dataset = fit.open_dataset(config)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  nets = [foundation(c) for c in configs]
  applies = [jax.jit(lambda v, x, m=m: pool_tokens(m.apply(v, x, train=False, return_blocks=True)["blocks"][-1]))
             for m, _ in nets]
  # Each model sees the same examples at its own config's resolution and normalisation (CLIP's
  # constants for OpenCLIP/BLIP under data.norm=model): one loader per distinct input, in step.
  inputs = [(c.data.resolution, build.input_norm(c)) for c in configs]
  loaders = {i: cka_batches(configs[inputs.index(i)], dataset, split, mesh, max_examples, config.batch_size)
             for i in dict.fromkeys(inputs)}
  acc = cka_lib.MinibatchCKA()
  for step in zip(*loaders.values()):
    images = {i: arrays["image"] for i, (arrays, _) in zip(loaders, step)}
    valid = step[0][1]
    acc.update([gather(f(v, images[i]))[valid] for f, (_, v), i in zip(applies, nets, inputs)])
  names = [c.model.name for c in configs]
  out = cka_lib.result_json("foundations", names, names, acc.result(), dataset=dataset.spec.name, split=split,
                            num_examples=acc.num_examples, title=f"CKA of the last block, {dataset.spec.name}")
  path = epath.Path(out_dir) / "cka_foundations.json"

  def write():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float))
  parallel.on_process_zero(f"write {path}", write)
  return str(path)
