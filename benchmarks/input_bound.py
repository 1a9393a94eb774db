r"""Does the input pipeline starve the train step? The trainer's loop timed three ways in turns:

  resident   the step on one device-resident batch (the ceiling);
  pipeline   what `mfjax train` does: next batch from the grain loader (decode + paper transforms),
             `global_batch` (host-to-device), dispatch the step, read the previous step's metrics;
  prefetch   the same with the next batches assembled on the device by a background thread
             (two batches ahead), so the host work overlaps the step.

  PYTHONPATH=. python -m benchmarks.input_bound --model deit_base_patch16 --res 224 --batch 8 \
      --workers 0 [--image-size 1024]

The dataset is a synthetic APTOS of --num-images JPEGs of --image-size pixels. Reported: images/s
of each loop and the stall, 1 - (loop / resident). A stall near zero means the pipeline keeps up.
"""
import argparse
import os
import queue
import sys
import threading
import time

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("model", "model"), ("res", "res"), ("batch", "batch"),
           ("source px", "image_size"), ("workers", "workers"), ("resident img/s", "resident_img_s"),
           ("pipeline img/s", "pipeline_img_s"), ("stall", "pipeline_stall"), ("prefetch img/s", "prefetch_img_s"),
           ("stall with prefetch", "prefetch_stall"), ("load", "load_average")]


def prefetch_to_device(batches, sharding, depth: int = 2):
  """Yield `global_batch(b)` for b in `batches`, assembled `depth` batches ahead by a thread."""
  from mfjax import data as mdata
  buffer = queue.Queue(maxsize=depth)
  done = object()

  def fill():
    for b in batches:
      buffer.put(mdata.global_batch(b, sharding))
    buffer.put(done)

  threading.Thread(target=fill, daemon=True).start()
  while (item := buffer.get()) is not done:
    yield item


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="deit_base_patch16")
  parser.add_argument("--protocol", default="unfrozen_linear")
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--workers", type=int, default=0, help="grain worker processes (config.data.num_workers)")
  parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic source JPEGs")
  parser.add_argument("--num-images", type=int, default=64)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per timing")
  parser.add_argument("--drain", type=int, default=3, help="untimed steps before each timing")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None)
  args, extra = common.parse_args(parser, argv)

  import jax
  import jax.numpy as jnp
  from benchmarks import jax_side
  from mfjax import data as mdata
  from mfjax import parallel
  from mfjax.train import fit

  load_start = os.getloadavg()[0]
  config = jax_side.paper_config(args.model, args.protocol, args.res, args.batch,
                                 [f"--config.data.num_workers={args.workers}", *extra],
                                 dataset=(args.num_images, args.image_size))
  run = fit.prepare(config)
  sharding = parallel.batch_sharding(run.mesh)
  lr = jnp.float32(1e-4)
  holder = {"state": run.state}
  def loader():
    return iter(run.train_loader(None))  # the trainer's own loader, repeating

  host_batches, prefetched = loader(), prefetch_to_device(loader(), sharding)
  resident = mdata.global_batch(next(loader()), sharding)
  compiled = run.train_step.lower(holder["state"], resident, lr).compile()
  next_batch = {"resident": lambda: resident,
                "pipeline": lambda: mdata.global_batch(next(host_batches), sharding),
                "prefetch": lambda: next(prefetched)}

  def timed_loop(name) -> float:
    """Seconds per step of args.steps steps run as the trainer runs them (metrics read one step
    late), after args.drain untimed steps that empty the buffers filled while this loop waited."""
    pending, start = None, None
    for i in range(args.drain + args.steps):
      if i == args.drain:
        jax.block_until_ready((holder["state"], pending))
        start = time.perf_counter()
      holder["state"], metrics = compiled(holder["state"], next_batch[name](), lr)
      if pending is not None:
        float(pending["loss"])
      pending = metrics
    jax.block_until_ready((holder["state"], pending))
    return (time.perf_counter() - start) / args.steps

  times = {name: [] for name in next_batch}
  for _ in range(args.rounds):
    for name in next_batch:
      times[name].append(timed_loop(name))
  img_s = {k: args.batch / common.summary(v)["median_s"] for k, v in times.items()}
  env = common.environment()
  stall = lambda k: f"{max(0.0, 1 - img_s[k] / img_s['resident']):.1%}"
  row = {"benchmark": "input_bound", "device": env["device"], "model": args.model, "res": args.res,
         "batch": args.batch, "image_size": args.image_size, "workers": args.workers,
         "resident_img_s": common.fmt(img_s["resident"]), "pipeline_img_s": common.fmt(img_s["pipeline"]),
         "pipeline_stall": stall("pipeline"), "prefetch_img_s": common.fmt(img_s["prefetch"]),
         "prefetch_stall": stall("prefetch"), "load_average": f"{load_start:.1f}-{os.getloadavg()[0]:.1f}",
         "timings_s": {k: common.summary(v) for k, v in times.items()}, "steps_per_timing": args.steps,
         "drain_steps": args.drain,
         "config_overrides": extra,
         "command": "python -m benchmarks.input_bound " + " ".join(argv if argv is not None else sys.argv[1:]),
         **env}
  common.emit(row, COLUMNS, args.out)
  return row


if __name__ == "__main__":
  main()
