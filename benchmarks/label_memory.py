r"""Host memory of turning a volume's sliding-window logits into labels: the whole volume's logits
at once (before 2026-12-06) against `segmentation.labels_in_chunks` (what validation and
`mfjax segment --predict` do now), each in a fresh process so that its peak RSS is its own.

  PYTHONPATH=. python -m benchmarks.label_memory --slices 200 --size 256 --classes 16 --patch 128

The network is replaced by a pixelwise map (the memory of the stitching is what is measured);
both ways must give the same labels, which the row checks.
"""
import argparse
import json
import subprocess
import sys
import time

from benchmarks import common

COLUMNS = [("device", "device"), ("slices", "slices"), ("slice px", "size"), ("classes", "classes"),
           ("patch", "patch"), ("whole-volume peak RSS MiB", "whole_mib"), ("chunked peak RSS MiB", "chunked_mib"),
           ("whole s", "whole_s"), ("chunked s", "chunked_s"), ("same labels", "same_labels")]


def measure(way: str, slices: int, size: int, classes: int, patch: int, chunk: int) -> dict:
  """Run in its own process: label one synthetic volume `way` ("whole" or "chunked")."""
  import numpy as np
  from mfjax.evals import segmentation
  rng = np.random.default_rng(0)
  weights = rng.standard_normal(classes).astype(np.float32)
  volume = rng.standard_normal((slices, size, size)).astype(np.float32)
  logits_of = lambda s: segmentation.predict_slices(lambda images: images * weights, s, (patch, patch), classes, 8)
  shape = (size + size // 8, size + size // 8)  # the original grid differs from the preprocessed one
  start_rss, t0 = common.peak_rss_bytes(), time.perf_counter()
  if way == "whole":
    labels = segmentation.labels_at_shape(logits_of(volume), shape)
  else:
    labels = segmentation.labels_in_chunks(logits_of, volume, shape, chunk=chunk)
  return {"mib": (common.peak_rss_bytes() - start_rss) / 2 ** 20, "seconds": time.perf_counter() - t0,
          "checksum": int(labels.astype(np.int64).sum())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--slices", type=int, default=200)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--classes", type=int, default=16)
  parser.add_argument("--patch", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=8, help="slices per chunk (validation uses eval.batch_size)")
  parser.add_argument("--measure", choices=["whole", "chunked"], help=argparse.SUPPRESS)
  parser.add_argument("--out")
  args, _ = common.parse_args(parser, argv)
  shape_args = (args.slices, args.size, args.classes, args.patch, args.chunk)
  if args.measure:
    print(json.dumps(measure(args.measure, *shape_args)))
    return
  results = {}
  for way in ("whole", "chunked"):
    cmd = [sys.executable, "-m", "benchmarks.label_memory", "--measure", way, "--slices", str(args.slices),
           "--size", str(args.size), "--classes", str(args.classes), "--patch", str(args.patch),
           "--chunk", str(args.chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.exit(f"{way}: {proc.stderr[-2000:]}")
    results[way] = json.loads(proc.stdout.strip().splitlines()[-1])
  row = {**common.environment(), "benchmark": "label_memory", "slices": args.slices, "size": args.size,
         "classes": args.classes, "patch": args.patch, "chunk": args.chunk,
         "whole_mib": round(results["whole"]["mib"]), "chunked_mib": round(results["chunked"]["mib"]),
         "whole_s": round(results["whole"]["seconds"], 2), "chunked_s": round(results["chunked"]["seconds"], 2),
         "same_labels": results["whole"]["checksum"] == results["chunked"]["checksum"]}
  common.emit(row, COLUMNS, args.out)


if __name__ == "__main__":
  main()
