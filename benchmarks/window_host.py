r"""Host time of the sliding window (validation and `mfjax segment --predict`) per slice, with a
stand-in network cheap enough that what is timed is the work around it:

  host    the network returns raw logits; each flip is a call and a transfer, and the flips,
          their average and the Gaussian weighting run in NumPy (before 2026-12-06);
  device  `segment.make_predictor`'s way: flips, average and Gaussian inside one jitted call
          (`segmentation.weighted_tile_logits`), one transfer per batch of tiles.

  PYTHONPATH=. python -m benchmarks.window_host --size 512 --patch 512 --classes 16 --slices 16 --mirror

Both give the same logits (checked). The stand-in is a jitted pixelwise map, so on a GPU the
figures are the host's share of a real run's time; the network's own time comes on top.
"""
import argparse
import time

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("slice px", "size"), ("patch", "patch"), ("classes", "classes"),
           ("mirror", "mirror"), ("host ms/slice", "host_ms"), ("device ms/slice", "device_ms"),
           ("speed-up", "speedup"), ("same logits", "same")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--patch", type=int, default=512)
  parser.add_argument("--classes", type=int, default=16)
  parser.add_argument("--slices", type=int, default=16)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--mirror", action="store_true")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out")
  args, _ = common.parse_args(parser, argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mfjax.evals import segmentation

  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal(args.classes).astype(np.float32))
  network = lambda images: images * w
  slices = rng.standard_normal((args.slices, args.size, args.size)).astype(np.float32)
  patch = (args.patch, args.patch)
  raw = jax.jit(network)
  weights = jnp.asarray(segmentation.gaussian_weights(patch))
  fused = jax.jit(lambda images: segmentation.weighted_tile_logits(network, images, weights, args.mirror))
  ways = {"host": lambda: segmentation.predict_slices(lambda x: np.asarray(raw(x)), slices, patch, args.classes,
                                                      args.batch, mirror=args.mirror),
          "device": lambda: segmentation.predict_slices(lambda x: np.asarray(fused(x)), slices, patch, args.classes,
                                                        args.batch, weighted=True)}
  outputs = {name: fn() for name, fn in ways.items()}  # warm-up (compiles), and the logits compared
  times = {name: [] for name in ways}
  for _ in range(args.rounds):
    for name, fn in ways.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  ms = {name: float(np.median(t)) / args.slices * 1e3 for name, t in times.items()}
  row = {**common.environment(), "benchmark": "window_host", "size": args.size, "patch": args.patch,
         "classes": args.classes, "slices": args.slices, "batch": args.batch, "mirror": args.mirror,
         "rounds": args.rounds, "host_ms": round(ms["host"], 1), "device_ms": round(ms["device"], 1),
         "speedup": f"{ms['host'] / ms['device']:.2f}x",
         "same": bool(np.allclose(outputs["host"], outputs["device"], rtol=1e-5, atol=1e-5))}
  common.emit(row, COLUMNS, args.out)


if __name__ == "__main__":
  main()
