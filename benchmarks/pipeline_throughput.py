"""Input-pipeline throughput: mfjax (tfds array_record + grain) vs torchvision DataLoader.

Both decode the same JPEG files (ISIC-like, written by mfjax.data.synthetic; the mfjax
dataset stores the original JPEG bytes, so both decode identical bytes) and apply the
paper's train transforms (resize to 256/224 of R, centre crop, RandomResizedCrop with scale
(0.8, 1.2), flips, ColorJitter p=0.8, normalize) at resolution R, in the same run.

    PYTHONPATH=. python benchmarks/pipeline_throughput.py [--image-size 1024] [--num-images 96]

Also timed: mfjax with jpeg_draft=True (JPEG decoded at 1/2-1/8 scale; not torchvision-exact).

Reported: images/s per worker. "0 workers" decodes in the main process (torch: num_workers=0;
mfjax: worker_count=0 with one read thread); "1 worker" uses one separate worker process in
each. Both use one thread per worker (torch.set_num_threads(1), read_threads=1). The
pipelines are timed in turns, several rounds, and the median is reported, so a change in
machine load during the run affects all of them alike; each timing starts after draining
the prefetch buffers the pipeline filled while it waited.
"""
import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def mfjax_batches(ds, resolution, batch_size, workers, jpeg_draft=False):
  import mfjax.data
  loader = mfjax.data.make_loader(ds, "train", batch_size=batch_size, train=True, resolution=resolution,
                                  seed=0, num_epochs=None, shard_index=0, shard_count=1,
                                  worker_count=workers, read_threads=1, prefetch=2, jpeg_draft=jpeg_draft)
  it = iter(loader)
  while True:
    batch = next(it)
    assert batch["image"].shape == (batch_size, resolution, resolution, 3)
    yield


def torch_batches(paths, mean, std, resolution, batch_size, workers):
  import PIL.Image
  import torch
  from torchvision import transforms as T
  torch.set_num_threads(1)
  size = round(resolution * 256 / 224)
  transform = T.Compose([
      T.Resize((size, size)), T.CenterCrop(resolution),
      T.RandomResizedCrop(resolution, scale=(0.8, 1.2), interpolation=T.InterpolationMode.BILINEAR),
      T.RandomVerticalFlip(0.5), T.RandomHorizontalFlip(0.5),
      T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.8), T.ToTensor(), T.Normalize(mean, std)])

  class Files(torch.utils.data.Dataset):
    def __len__(self):
      return len(paths)

    def __getitem__(self, i):
      with open(paths[i], "rb") as f:
        image = PIL.Image.open(f).convert("RGB")
      return transform(image), 0

  loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, prefetch_factor=2 if workers else None,
                                       persistent_workers=workers > 0,
                                       worker_init_fn=lambda _: torch.set_num_threads(1))
  while True:
    for images, _ in loader:
      assert tuple(images.shape) == (batch_size, 3, resolution, resolution)
      yield


def images_per_second(batches, num_batches, batch_size):
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * batch_size / (time.perf_counter() - start)


def measure(pipelines, num_batches, batch_size, rounds, drain):
  """Median images/s of each pipeline over `rounds` timings taken in turns.

  Before each timing, `drain` batches are taken untimed: a pipeline that sat idle while
  the others were timed has filled its prefetch buffers, and only once they are empty does
  the clock measure decoding rather than buffered batches.
  """
  timings = {name: [] for name in pipelines}
  for _ in range(rounds):
    for name, batches in pipelines.items():
      for _ in range(drain):
        next(batches)
      timings[name].append(images_per_second(batches, num_batches, batch_size))
  for batches in pipelines.values():
    batches.close()
  return {name: float(np.median(t)) for name, t in timings.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num-images", type=int, default=96)
  parser.add_argument("--image-size", type=int, default=1024, help="side of the square source JPEGs")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 1024])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--images-per-run", type=int, default=32, help="timed images per measurement")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements per pipeline (median)")
  parser.add_argument("--drain", type=int, default=6, help="untimed batches before each measurement")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args()

  import absl.flags
  absl.flags.FLAGS.mark_as_parsed()
  import mfjax.data
  from mfjax.data import synthetic

  with tempfile.TemporaryDirectory() as tmp:
    manual = synthetic.isic2019(os.path.join(tmp, "isic"), num_images=args.num_images, size=args.image_size)
    ds = mfjax.data.build("isic2019", manual, os.path.join(tmp, "tfds"))
    source = ds.source("train")
    paths = [os.path.join(manual, "ISIC_2019_Training_Input", source[i]["id"].decode() + ".jpg")
             for i in range(len(source))]
    with open(paths[0], "rb") as f:
      assert source[0]["image"] == f.read(), "the dataset should hold the original JPEG bytes"
    results = []
    for resolution in args.resolutions:
      num_batches = max(1, args.images_per_run // args.batch_size)
      for workers in args.workers:
        speeds = measure({
            "torch": torch_batches(paths, ds.spec.mean, ds.spec.std, resolution, args.batch_size, workers),
            "mfjax": mfjax_batches(ds, resolution, args.batch_size, workers),
            "mfjax_jpeg_draft": mfjax_batches(ds, resolution, args.batch_size, workers, jpeg_draft=True),
        }, num_batches, args.batch_size, args.rounds, args.drain)
        row = {"resolution": resolution, "workers": workers,
               "torch_images_per_s": round(speeds["torch"], 1),
               "mfjax_images_per_s": round(speeds["mfjax"], 1),
               "ratio_mfjax_over_torch": round(speeds["mfjax"] / speeds["torch"], 3),
               "mfjax_jpeg_draft_images_per_s": round(speeds["mfjax_jpeg_draft"], 1),
               "ratio_jpeg_draft_over_torch": round(speeds["mfjax_jpeg_draft"] / speeds["torch"], 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
  header = {"source_jpeg": f"{args.image_size}x{args.image_size}", "train_images": len(paths),
            "batch_size": args.batch_size, "rounds": args.rounds, "drain_batches": args.drain, "images_per_run": args.images_per_run,
            "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version()}
  print("\n| resolution | workers | torchvision img/s per worker | mfjax img/s per worker | ratio "
        "| mfjax jpeg_draft img/s per worker | ratio |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    per = max(1, r["workers"])
    print(f"| {r['resolution']} | {r['workers']} | {r['torch_images_per_s'] / per:.1f} | "
          f"{r['mfjax_images_per_s'] / per:.1f} | {r['ratio_mfjax_over_torch']:.2f} | "
          f"{r['mfjax_jpeg_draft_images_per_s'] / per:.1f} | {r['ratio_jpeg_draft_over_torch']:.2f} |")
  print(json.dumps(header))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"setup": header, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
