"""`mfjax demo` (`make demo`): the benchmark end to end on a synthetic APTOS-layout dataset.

Small models of four families (DeiT-B as the ImageNet baseline, DINOv2, SEEM's FocalNet, ResNet;
random weights, shrunk by configs/tiny.py), the paper's four protocols x 2 seeds, k-NN of every
foundation, CKA before/after fine-tuning and between foundations, and the report beside the
paper's numbers. Needs only the core install (no PyTorch) and a few minutes on 2 CPU cores.

The numbers say that the pipeline works, not which foundation is best: the data is synthetic
(grade = number of bright lesions) and the weights are random. Real checkpoints
(`python -m convert ...`) and real datasets give the paper's study with the same commands.
"""
import logging
import os
import shutil
import time

from mfjax.config import ConfigError
from mfjax.data import synthetic

log = logging.getLogger("mfjax")

MODELS = ("deit_base_patch16", "dinov2_vitb14", "seem_focalt", "resnet152")
PROTOCOLS = ("frozen_linear", "frozen_deit", "unfrozen_linear", "unfrozen_deit")
KS = (5, 10, 20, 50)  # those above the training split's size are left out (a small --images)


def demo_sweep(downloads: str, data_dir: str, epochs: int, seeds: int, models=MODELS) -> dict:
  return dict(config="configs/tiny.py", data_root=downloads,
              axes={"model": list(models), "dataset": ["aptos2019"], "protocol": list(PROTOCOLS),
                    "lr": [1e-3], "seed": list(range(seeds))},
              fixed={"epochs": epochs, "batch_size": 16, "data.data_dir": data_dir, "data.resolution": 32})


def run(out_dir: str = "demo_out", num_images: int = 240, image_size: int = 64, epochs: int = 3,
        seeds: int = 2, models=MODELS) -> str:
  from mfjax import data as mdata
  from mfjax.cli import load_config
  from mfjax.evals import studies
  from mfjax.train import fit, sweep as msweep
  from mfjax import report
  start = time.time()
  fit.quiet_libraries()
  out_dir = os.path.abspath(out_dir)
  downloads, data_dir, runs_dir = (os.path.join(out_dir, d) for d in ("downloads", "data", "runs"))

  print(f"[1/5] writing {num_images} synthetic fundus images in the APTOS 2019 layout and building the dataset")
  manual = synthetic.aptos2019(os.path.join(downloads, "aptos2019"), num_images=num_images, size=image_size)
  try:
    dataset = mdata.build("aptos2019", manual, data_dir)
  except mdata.DataError:  # written before with another --images: the demo's own data, built again,
    dataset = mdata.build("aptos2019", manual, data_dir, overwrite=True)
    if os.path.isdir(runs_dir):  # and its runs, trained on the old images, trained again
      print(f"      the data changed since the demo in {out_dir}: its runs are trained again")
      shutil.rmtree(runs_dir)
  ks = tuple(k for k in KS if k <= dataset.split_sizes["train"])
  if not ks:
    raise ConfigError(f"--images {num_images} leaves {dataset.split_sizes['train']} training images, fewer than "
                      f"k-NN's smallest k={KS[0]}: give more images")

  sweep = demo_sweep(downloads, data_dir, epochs, seeds, models)
  n = len(msweep.expand(sweep, runs_dir))
  print(f"[2/5] training {n} runs: {len(models)} foundations x {len(PROTOCOLS)} protocols x {seeds} seeds")
  earlier = os.path.isdir(runs_dir)
  try:
    msweep.run_all(sweep, runs_dir)
  except ConfigError as e:
    if not earlier:
      raise
    raise ConfigError(f"{out_dir} holds a demo made with other settings ({e}); delete it or give another --out") \
        from None

  print(f"[3/5] k-NN on each foundation's pooled features (k = {', '.join(map(str, ks))})")
  base = "configs/tiny.py:dataset=aptos2019,model={}"
  overrides = [f"--config.data.manual_dir={manual}", f"--config.data.data_dir={data_dir}",
               "--config.batch_size=16"]
  for model in models:
    config = load_config(base.format(model), overrides)
    studies.knn(config, os.path.join(runs_dir, "knn", model), ks=ks,
                cache_dir=os.path.join(out_dir, "feature_cache"))

  print("[4/5] CKA: foundations before vs after fine-tuning, the stacked head, and between foundations")
  for model in models:
    for run_ in msweep.expand(sweep, runs_dir):
      if run_.values["model"] == model and run_.values["protocol"] == "unfrozen_deit" and run_.values["seed"] == 0:
        studies.cka_run(run_.workdir)
  studies.cka_foundations([load_config(base.format(m), overrides) for m in models],
                          os.path.join(runs_dir, "cka_foundations"))

  print("[5/5] writing the report")
  summary = report.build(runs_dir, os.path.join(out_dir, "report"))
  minutes = (time.time() - start) / 60
  print(f"\nDone in {minutes:.1f} min. Report: {summary.get('markdown', os.path.join(out_dir, 'report', 'report.md'))}")
  if summary.get("html"):
    print(f"                 {summary['html']}")
  print("What the numbers mean: every table cell is the test quadratic-weighted kappa (APTOS's metric) of\n"
        "one foundation x protocol, mean ± std over the seeds, next to the paper's published value. Here\n"
        "the data is synthetic and the models are tiny and randomly initialised, so the values test the\n"
        "pipeline, not the foundations. Convert real checkpoints (README, 'Converting checkpoints') and\n"
        "point the sweeps at real downloads (README, 'Datasets') to run the paper's study.")
  return out_dir
