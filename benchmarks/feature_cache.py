r"""Frozen linear probing with and without the feature cache: epoch time and test metric.

  PYTHONPATH=. python -m benchmarks.feature_cache --model deit_base_patch16 --res 224 --batch 8 \
      --num-images 96 --epochs 4

Both runs are `mfjax.train.fit.prepare` on configs/paper.py with protocol frozen_linear and
data.augment=False, on a synthetic APTOS of --num-images JPEGs:

  recompute   data.cache_features=False: every step decodes the batch and runs the frozen
              foundation forward, then trains the linear head (what the paper's code does);
  cached      data.cache_features=True: `prepare` extracts the pooled features of every split
              once (timed separately as "cache build"), then every epoch trains the head on them.

Each run trains --epochs epochs through the trainer's own loader and step. The first epoch
holds the compile and is not counted; the epoch time is the median of the others. Both runs then
report the test split's headline metric (quadratic kappa on APTOS) and accuracy; they see the
same features, but shuffle in a different order and initialise the head from different random
streams, so their metrics agree within the run-to-run noise of a linear probe, not bitwise.
"""
import argparse
import os
import sys
import tempfile
import time

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("model", "model"), ("res", "res"), ("batch", "batch"),
           ("train images", "train_images"), ("recompute epoch s", "recompute_epoch_s"),
           ("cached epoch s", "cached_epoch_s"), ("speed-up", "speedup"), ("cache build s", "cache_build_s"),
           ("recompute test kappa", "recompute_metric"), ("cached test kappa", "cached_metric"),
           ("recompute test acc", "recompute_accuracy"), ("cached test acc", "cached_accuracy"),
           ("load", "load_average")]


def train_epochs(run, epochs: int, lr: float) -> list[float]:
  """Seconds of each of `epochs` epochs of the trainer's loop (loader, host-to-device, step)."""
  import jax
  import jax.numpy as jnp
  from mfjax import data as mdata
  from mfjax import parallel
  sharding = parallel.batch_sharding(run.mesh)
  lr = jnp.float32(lr)
  seconds = []
  batches = iter(run.train_loader(epochs))
  for _ in range(epochs):
    start = time.perf_counter()
    for _ in range(run.steps_per_epoch):
      run.state, metrics = run.train_step(run.state, mdata.global_batch(next(batches), sharding), lr)
    jax.block_until_ready((run.state, metrics))
    seconds.append(time.perf_counter() - start)
  return seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="deit_base_patch16")
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--num-images", type=int, default=96)
  parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic source JPEGs")
  parser.add_argument("--epochs", type=int, default=4, help="per run; the first (compile) is not timed")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--out", default=None)
  args, extra = common.parse_args(parser, argv)
  if args.epochs < 2:
    parser.error("--epochs must be >= 2: the first epoch holds the compile and is not timed")

  from benchmarks import jax_side
  from mfjax.train import fit

  load_start = os.getloadavg()[0]
  results = {}
  with tempfile.TemporaryDirectory() as cache_dir:
    for mode in ("recompute", "cached"):
      config = jax_side.paper_config(
          args.model, "frozen_linear", args.res, args.batch,
          ["--config.data.augment=False", f"--config.data.cache_features={mode == 'cached'}",
           f"--config.data.feature_cache={cache_dir}", *extra],
          dataset=(args.num_images, args.image_size))
      start = time.perf_counter()
      run = fit.prepare(config)
      prepare_s = time.perf_counter() - start
      if run.cached_features != (mode == "cached"):
        raise RuntimeError(f"{mode}: prepare chose cached_features={run.cached_features}")
      epochs = train_epochs(run, args.epochs, args.lr)
      test = run.evaluate("test", run.state)
      results[mode] = {"prepare_s": prepare_s, "epoch_seconds": epochs,
                       "epoch_s": common.summary(epochs[1:])["median_s"], "test": test,
                       "train_images": run.dataset.split_sizes["train"]}

  env = common.environment()
  rec, cac = results["recompute"], results["cached"]
  metric = run.spec.headline_metric
  row = {"benchmark": "feature_cache", "device": env["device"], "model": args.model, "res": args.res,
         "batch": args.batch, "train_images": rec["train_images"],
         "recompute_epoch_s": common.fmt(rec["epoch_s"], ".3f"), "cached_epoch_s": common.fmt(cac["epoch_s"], ".4f"),
         "speedup": common.fmt(rec["epoch_s"] / cac["epoch_s"], ".0f") + "x",
         # prepare() of the cached run extracts train, validation and test features once.
         "cache_build_s": common.fmt(cac["prepare_s"], ".1f"),
         "recompute_metric": common.fmt(rec["test"][metric], ".3f"), "cached_metric": common.fmt(cac["test"][metric], ".3f"),
         "recompute_accuracy": common.fmt(rec["test"].get("accuracy"), ".3f"),
         "cached_accuracy": common.fmt(cac["test"].get("accuracy"), ".3f"),
         "headline_metric": metric, "load_average": f"{load_start:.1f}-{os.getloadavg()[0]:.1f}",
         "runs": results, "config_overrides": extra,
         "command": "python -m benchmarks.feature_cache " + " ".join(argv if argv is not None else sys.argv[1:]),
         **env}
  common.emit(row, COLUMNS, args.out)
  return row


if __name__ == "__main__":
  main()
