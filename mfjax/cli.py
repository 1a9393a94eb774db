"""`mfjax` command line: train, eval, sweep, knn, cka, cache, report, demo, segment, pretrain.

  mfjax train --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019,protocol=unfrozen_linear \
              --config.data.manual_dir=~/data/aptos2019 --workdir runs/x
  mfjax eval  --workdir runs/x [--split test]
  mfjax sweep --sweep configs/sweeps/paper.py:data_root=~/data,checkpoint_root=ckpt --runs-dir runs/paper [--list]
  mfjax knn   --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019 --config.model.checkpoint=ckpt/dinov2_vitb14 \
              --config.data.manual_dir=~/data/aptos2019 --out runs/knn/dinov2
  mfjax cka   --workdir runs/x                      (foundation and head, before vs after fine-tuning)
  mfjax cka   --config configs/paper.py:dataset=aptos2019 --models dinov2_vitb14+sam_vitb --checkpoints ckpt/a+ckpt/b --out runs/cka
  mfjax cache [--unused-days 30] [--max-gb 200] [--prune]      (the feature cache: list, then delete)
  mfjax report runs/ [--out runs/report]
  mfjax segment --config configs/segment.py:raw=nnUNet_raw/Dataset219_AMOS2022_postChallenge_task2,fold=0 \
                --config.model.checkpoint=ckpt/meddinov3_vitb16 --workdir runs/amos_fold0
  mfjax segment --workdir runs/amos_fold0 --predict nnUNet_raw/Dataset219_AMOS2022_postChallenge_task2/imagesTs \
                --out predictions/amos
  mfjax segment --workdir runs/amos_fold0 --workdir runs/amos_fold1 ... --predict IMAGES --out OUT   (fold ensemble)
  mfjax segment --workdir runs/amos_fold0 ... --predict IMAGES --out OUT --save-probabilities   (for nnUNetv2_ensemble)
  mfjax segment --workdir runs/amos_fold0 ... --determine-postprocessing --out postprocessing.json
  mfjax segment --workdir runs/amos_fold0 ... --predict IMAGES --out OUT --postprocessing postprocessing.json
  mfjax segment --import-nnunet nnUNet_results/Dataset219_AMOS/TRAINER__nnUNetPlans__2d --fold 0 \
      --workdir runs/amos_nnunet_fold0     (a MedDINOv3 network trained by nnU-Net, then --predict with it)
  mfjax pretrain --config configs/pretrain.py --config.data.folders=ct/volumes --workdir runs/pretrain
"""
import argparse
import ast
import importlib.util
import json
import logging
import os
import sys

import ml_collections

from mfjax import hostmem
from mfjax.config import ConfigError, DataError, RunStopped, check_choice
from mfjax.train.lock import WorkdirBusy

log = logging.getLogger("mfjax")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOPPED_BY_CTRL_C = 130  # the shell's status for a command ended by SIGINT: a `&&` chain or a loop stops too
WORKDIR_BUSY = 75  # EX_TEMPFAIL: another job trains in the workdir (mfjax.train.lock); a launcher does not retry
# Exit status 2: a mistake the error names (a config key, a data file, a path), which a launcher does not retry;
# 1: a run that stopped for a reason starting again may clear (an I/O error, another process's failure).
INPUT_MISTAKES = (ConfigError, DataError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def stopped_status(result: dict) -> int:
  """The exit status of a run that saved and stopped (`Preemption.stopped`): 130 after Ctrl-C, 0 after SIGTERM."""
  return STOPPED_BY_CTRL_C if result.get("signal") == "SIGINT" else 0


def resolve_config_file(path: str) -> str:
  """A config file relative to the working directory, else to the mfjax checkout (configs/...)."""
  if os.path.isfile(path):
    return path
  if os.path.isfile(os.path.join(REPO_ROOT, path)):
    return os.path.join(REPO_ROOT, path)
  places = " and ".join(dict.fromkeys((os.getcwd(), REPO_ROOT)))
  raise ConfigError(f"config file {path} not found (looked in {places})")


def load_config(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
  """`path/to/file.py[:args]` -> get_config(args), then `--config.a.b=value` overrides."""
  path, _, arg = spec.partition(":")
  path = resolve_config_file(path)
  module_spec = importlib.util.spec_from_file_location("mfjax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg)
  for item in overrides:
    key, eq, value = item.partition("=")
    if not eq:
      raise ConfigError(f"override {item!r} is not --config.key=value")
    set_field(config, key.removeprefix("--config.").removeprefix("config."), value)
  return config


def set_field(config, dotted: str, value: str) -> None:
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "config"
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if isinstance(node, ml_collections.ConfigDict) and where.endswith(("overrides", "options")):
        node[part] = _parse(value, None)  # free-form dicts: model overrides, dataset options
        return
      raise ConfigError(f"unknown config field {dotted!r}: {where} has no {part!r}; valid: {valid}")
    if i == len(parts) - 1:
      node[part] = _parse(value, node[part], dotted)
    else:
      node = node[part]


def _parse(value: str, current, name=""):
  if isinstance(current, str):
    return value
  if isinstance(current, bool) and value.strip().lower() in ("true", "false"):  # as in configs' key=value
    return value.strip().lower() == "true"
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    if current is None:
      return value
    parsed = None
  if isinstance(current, bool) and not isinstance(parsed, bool):
    raise ConfigError(f"--config.{name}={value!r}: expected True or False")
  if isinstance(parsed, bool) and current is not None and not isinstance(current, bool):  # True is an int too
    raise ConfigError(f"--config.{name}={value!r}: expected a {type(current).__name__}")
  if parsed is None and current is not None:
    raise ConfigError(f"--config.{name}={value!r}: expected a {type(current).__name__}")
  if isinstance(current, float) and isinstance(parsed, int):
    parsed = float(parsed)
  if current is not None and not isinstance(parsed, type(current)) and not (
      isinstance(current, (list, tuple)) and isinstance(parsed, (list, tuple))):
    raise ConfigError(f"--config.{name}={value!r}: expected a {type(current).__name__}")
  return parsed


# XLA's quickest CPU compile, for tiny models where compiling dominates (the demo, the test suite):
# its cheapest code generation, and element-wise emitters in place of the fusion emitters (about
# half the compile time again; they lower a scatter to a loop, which XLA's FLOP count sees once).
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                       "--xla_cpu_use_fusion_emitters=false")


def with_quick_compile(xla_flags: str) -> str:
  """`xla_flags` plus QUICK_COMPILE_FLAGS, unless it sets the optimisation level itself."""
  if "xla_backend_optimization_level" in xla_flags:
    return xla_flags
  return " ".join([xla_flags, *QUICK_COMPILE_FLAGS]).strip()


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache (~/.cache/mfjax/jax, or $JAX_COMPILATION_CACHE_DIR):
  the runs of a sweep that differ only in seed or learning rate compile once."""
  import jax
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/mfjax/jax"))


def _config_overrides(parser, rest: list[str]) -> list[str]:
  for i, arg in enumerate(rest):
    if arg.startswith("--config.") and "=" not in arg:
      value = rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else "VALUE"
      parser.error(f"{arg} takes its value after '=': {arg}={value}")
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {bad}")
  return list(rest)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mfjax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("train", help="train one (model, dataset, protocol) cell")
  p.add_argument("--config", required=True, help="configs/FILE.py[:key=value,...]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--no-progress", action="store_true")
  p = sub.add_parser("sweep", help="run (or list) a grid of training runs; select lr per cell")
  p.add_argument("--sweep", required=True, help="configs/sweeps/FILE.py[:key=value,...]")
  p.add_argument("--runs-dir", required=True)
  p.add_argument("--list", action="store_true",
                 help="print the `mfjax train` command of every unfinished run (for a launcher) and exit")
  p.add_argument("--select-only", action="store_true", help="only (re)compute the lr selection")
  p.add_argument("--no-progress", action="store_true")
  p = sub.add_parser("knn", help="k-NN evaluation of a foundation's pooled features")
  p.add_argument("--config", required=True, help="configs/FILE.py[:model=...,dataset=...]")
  p.add_argument("--out", required=True, help="folder for knn.json")
  p.add_argument("--ks", default="10,20,50,100,200", help="comma-separated k values")
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--cache", default="~/.cache/mfjax/features", help="feature cache folder")
  p = sub.add_parser("cache", help="list the feature cache's entries; select unused ones and --prune them")
  p.add_argument("--cache", default="~/.cache/mfjax/features", help="the feature cache folder (data.feature_cache)")
  p.add_argument("--unused-days", type=float, help="select the entries not used (written or read) for this many days")
  p.add_argument("--max-gb", type=float, help="select the least recently used entries until the rest fit in this")
  p.add_argument("--prune", action="store_true", help="delete what is selected, and files left by killed writes")
  p = sub.add_parser("cka", help="linear CKA: a run before/after fine-tuning, or several foundations")
  p.add_argument("--workdir", help="a trained run: writes cka_layers.json (+ cka_stacked.json)")
  p.add_argument("--config", help="with --models: configs/FILE.py[:dataset=...] shared by the foundations")
  p.add_argument("--models", help="'+'-joined model names to compare (last block), e.g. dinov2_vitb14+sam_vitb")
  p.add_argument("--checkpoints", default="", help="'+'-joined converted folders matching --models")
  p.add_argument("--out", help="with --models: folder for cka_foundations.json")
  p.add_argument("--split", default="test", choices=["train", "validation", "test"])
  p.add_argument("--max-examples", type=int, default=0,
                 help="stop after the batch that reaches this many examples (whole batches; 0: all)")
  p = sub.add_parser("demo", help="the benchmark end to end on synthetic APTOS-layout data (a few minutes)")
  p.add_argument("--out", default="demo_out")
  p.add_argument("--images", type=int, default=240)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--seeds", type=int, default=2)
  p = sub.add_parser("eval", help="score a trained run's best checkpoint on a split")
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", default="test", choices=["train", "validation", "test"])
  p = sub.add_parser("report", help="tables and plots of a runs folder beside the paper's numbers")
  p.add_argument("runs_dir", help="folder searched for result.json, knn.json and cka_*.json")
  p.add_argument("--out", help="output folder (default RUNS_DIR/report)")
  p = sub.add_parser("segment", help="MedDINOv3 2-D segmentation on an nnU-Net raw dataset; or --predict volumes")
  p.add_argument("--config", help="configs/segment.py[:raw=PATH,...] (training)")
  p.add_argument("--workdir", required=True, action="append",
                 help="the run folder (trained in, or predicted with); with --predict, repeat it to average "
                      "the logits of several finished runs, e.g. the 5 folds, as nnU-Net does (a folder of "
                      "fold_* runs stands for all of them)")
  p.add_argument("--predict", help="a folder of NIfTI volumes to segment with a finished run")
  p.add_argument("--out", help="with --predict: the folder for the predicted label volumes")
  p.add_argument("--continue-prediction", action="store_true",
                 help="with --predict: skip the volumes whose prediction is in --out already (an interrupted run)")
  p.add_argument("--save-probabilities", action="store_true",
                 help="with --predict: also CASE.npz (the probabilities, float32 (C, z, y, x) in nnU-Net's reader "
                      "order) and CASE.pkl, as nnU-Net's --save_probabilities, for nnUNetv2_ensemble with its models")
  p.add_argument("--probabilities-reader", choices=["SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"],
                 help="with --save-probabilities for mfjax's own runs: the array order of the nnU-Net model to "
                      "ensemble with (its plans.json's image_reader_writer; default SimpleITKIO)")
  p.add_argument("--determine-postprocessing", action="store_true",
                 help="nnU-Net's postprocessing search (largest connected components) over the validation "
                      "predictions of the --workdir runs; --out names the JSON file it writes")
  p.add_argument("--postprocessing", help="with --predict: a file of --determine-postprocessing (or nnU-Net's "
                                         "postprocessing.json) to apply")
  p.add_argument("--import-nnunet", metavar="MODEL_FOLDER",
                 help="make --workdir a finished run from a MedDINOv3 network trained by nnU-Net: MODEL_FOLDER "
                      "holds plans.json, dataset.json and fold_F/checkpoint_final.pth")
  p.add_argument("--fold", default=None,
                 help="with --import-nnunet: the fold (0..4 or all; default 0), or several (0,1,2,3,4): each "
                      "into WORKDIR/fold_F, and a --workdir of such fold_* runs predicts with all of them")
  p.add_argument("--checkpoint-name", default=None,
                 help="with --import-nnunet: the checkpoint file in fold_F (default checkpoint_final.pth)")
  p.add_argument("--interaction-indices", default=None,
                 help="with --import-nnunet: the backbone blocks whose features feed the decoder (default 2,5,8,11)")
  p.add_argument("--rope-dtype", default=None, choices=["bfloat16", "float32"],
                 help="with --import-nnunet: RoPE precision (default bfloat16, as MedDINOv3's networks ran it)")
  p.add_argument("--no-progress", action="store_true")
  p = sub.add_parser("pretrain", help="MedDINOv3 pretraining (DINO + iBOT + KoLeo [+ Gram]) on CT volumes")
  p.add_argument("--config", required=True, help="configs/pretrain.py[:key=value,...]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--no-progress", action="store_true")
  args, rest = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # JAX tells at INFO that it found no TPU on every machine without one: noise in a CPU or GPU log.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  hostmem.keep_freed_memory()  # before JAX starts its threads
  if args.command == "demo":  # tiny models: set before JAX starts its backend
    os.environ["XLA_FLAGS"] = with_quick_compile(os.environ.get("XLA_FLAGS", ""))
  enable_compilation_cache()
  try:
    if args.command == "train":
      bad = [r for r in rest if not r.startswith("--config.")]
      if bad:
        parser.error(f"unrecognized arguments: {bad}")
      from mfjax.train import fit
      config = load_config(args.config, rest)
      result = fit.train(config, args.workdir, progress=not args.no_progress)
      if result.get("status") == "preempted":
        return stopped_status(result)
      print(json.dumps({"best_epoch": result["best_epoch"], "val": result["val"]["headline"],
                        "test": result["test"]["headline"], "metric": result["headline_metric"]}))
    elif args.command == "sweep":
      bad = [r for r in rest if not r.startswith("--config.")]
      if bad:
        parser.error(f"unrecognized arguments: {bad}")
      from mfjax.train import sweep
      spec = sweep.load_sweep(args.sweep)
      runs = sweep.expand(spec, args.runs_dir, rest)
      if args.list:
        from mfjax.train import build
        todo = [run for run in runs if not run.finished()]
        for run in todo:  # every command checked before any is printed: a launcher runs them far away
          build.check_names(load_config(run.config_spec, run.overrides))
        for run in todo:
          print(run.command())
        return 0
      selections = sweep.select(runs) if args.select_only else sweep.run_all(
          spec, args.runs_dir, rest, progress=not args.no_progress)
      if selections.get("signal") == "SIGINT":  # after SIGTERM the stop is printed, and the status is 0
        return stopped_status(selections)
      print(json.dumps(selections, indent=2, default=float))
    elif args.command == "cache":
      if rest:
        parser.error(f"unrecognized arguments: {rest}")
      for flag, value in (("--unused-days", args.unused_days), ("--max-gb", args.max_gb)):
        if value is not None and not value >= 0:
          parser.error(f"{flag} {value}: a number of at least 0")
      if args.prune and args.unused_days is None and args.max_gb is None:
        parser.error("--prune deletes what --unused-days or --max-gb select: give one of them")
      from mfjax.evals import knn as knn_lib
      print(knn_lib.cache_listing(args.cache, args.unused_days, args.max_gb, args.prune))
    elif args.command == "knn":
      from mfjax.evals import studies
      config = load_config(args.config, _config_overrides(parser, rest))
      try:
        ks = [int(k) for k in args.ks.split(",")]
      except ValueError:
        parser.error(f"--ks {args.ks!r}: comma-separated whole numbers (e.g. 10,20,200)")
      out = studies.knn(config, args.out, ks=ks, cache_dir=args.cache,
                        temperature=args.temperature)
      print(json.dumps({k: v["headline"] for k, v in out["k"].items()}))
    elif args.command == "cka":
      from mfjax.evals import studies
      if args.workdir:
        if rest:  # the run's own config decides; an override here would be ignored without a word
          parser.error(f"unrecognized arguments: {rest} (with --workdir, the run's saved config is used)")
        for path in studies.cka_run(args.workdir, args.split, args.max_examples or None):
          print(path)
      elif args.models and args.config and args.out:
        names = args.models.split("+")
        ckpts = args.checkpoints.split("+") if args.checkpoints else [""] * len(names)
        if len(ckpts) != len(names):
          parser.error("--checkpoints must list one folder per model in --models")
        from mfjax import models
        for name in names:  # every name, before any data is read
          check_choice("model", name, models.NAMES)
        path, _, arg = args.config.partition(":")
        arg = [item for item in arg.split(",") if item.strip() and not item.strip().startswith("model=")]
        configs = []
        for name, ckpt in zip(names, ckpts):  # model= as an argument: the config sets what follows from it
          configs.append(load_config(f"{path}:{','.join(arg + [f'model={name}'])}", _config_overrides(parser, rest) + [
              f"--config.model.name={name}", f"--config.model.checkpoint={ckpt}"]))
        print(studies.cka_foundations(configs, args.out, args.split, args.max_examples or None))
      else:
        parser.error("cka needs --workdir RUN, or --config, --models and --out")
    elif args.command == "demo":
      if rest:
        parser.error(f"unrecognized arguments: {rest}")
      from mfjax import demo
      demo.run(args.out, num_images=args.images, epochs=args.epochs, seeds=args.seeds)
    elif args.command == "eval":
      if rest:
        parser.error(f"unrecognized arguments: {rest}")
      from mfjax.train import fit
      print(json.dumps(fit.evaluate_run(args.workdir, args.split), indent=2, default=float))
    elif args.command == "segment":
      from mfjax.train import segment
      import_only = {"--fold": args.fold, "--checkpoint-name": args.checkpoint_name,
                     "--interaction-indices": args.interaction_indices, "--rope-dtype": args.rope_dtype}
      if not args.import_nnunet and any(v is not None for v in import_only.values()):
        given = [flag for flag, v in import_only.items() if v is not None]
        parser.error(f"{', '.join(given)} go with --import-nnunet (to train a fold: --config configs/segment.py:...,"
                     "fold=F)")
      if args.import_nnunet:
        defaults = {"fold": "0", "checkpoint_name": "checkpoint_final.pth", "interaction_indices": "2,5,8,11",
                    "rope_dtype": "bfloat16"}
        for name, default in defaults.items():
          if getattr(args, name) is None:
            setattr(args, name, default)
        if args.config or args.predict or args.out or args.determine_postprocessing or len(args.workdir) > 1:
          parser.error("segment --import-nnunet takes MODEL_FOLDER --fold F --workdir RUN (one) "
                       "[--config.model.dtype=bfloat16 --config.eval.batch_size=N ...], then --predict with that RUN")
        try:
          indices = tuple(int(i) for i in args.interaction_indices.split(","))
        except ValueError:
          parser.error(f"--interaction-indices {args.interaction_indices!r} is not a comma-separated list of blocks")
        folds = [f.strip() for f in args.fold.split(",")]
        if not all(folds) or len(set(folds)) != len(folds):
          parser.error(f"--fold {args.fold!r}: a fold (0..4, all) or a comma-separated list of distinct folds")
        runs = segment.import_nnunet_folds(args.import_nnunet, folds, args.workdir[0], args.checkpoint_name,
                                           interaction_indices=indices, rope_dtype=args.rope_dtype,
                                           config_overrides=_config_overrides(parser, rest))
        print("\n".join(runs))
        return 0
      if args.determine_postprocessing:
        if (args.config or rest or args.predict or args.postprocessing or args.continue_prediction
            or args.save_probabilities or args.probabilities_reader or not args.out):
          parser.error("segment --determine-postprocessing takes --workdir RUN [--workdir RUN ...] --out FILE.json")
        if os.path.isdir(args.out):
          parser.error(f"--out {args.out} is a folder; --determine-postprocessing writes a JSON file there")
        segment.determine_postprocessing(args.workdir, args.out, progress=not args.no_progress)
        print(args.out)
        return 0
      if args.predict:
        if args.config or rest or not args.out:
          parser.error("segment --predict takes --workdir RUN [--workdir RUN ...] --predict FOLDER --out FOLDER "
                       "[--postprocessing FILE] [--save-probabilities [--probabilities-reader R]] (no config)")
        if args.probabilities_reader and not args.save_probabilities:
          parser.error("--probabilities-reader goes with --save-probabilities")
        for path in segment.predict_folder(args.workdir, args.predict, args.out, progress=not args.no_progress,
                                           continue_prediction=args.continue_prediction,
                                           postprocessing=args.postprocessing,
                                           save_probabilities=args.save_probabilities,
                                           probabilities_reader=args.probabilities_reader):
          print(path)
        return 0
      if not args.config:
        parser.error("segment needs --config (training), --predict or --determine-postprocessing (with finished runs)")
      if (args.continue_prediction or args.out or args.postprocessing or args.save_probabilities
          or args.probabilities_reader):
        parser.error("--continue-prediction, --out, --postprocessing and --save-probabilities go with --predict")
      if len(args.workdir) > 1:
        parser.error("segment training takes one --workdir (several are for --predict)")
      config = load_config(args.config, _config_overrides(parser, rest))
      result = segment.train(config, args.workdir[0], progress=not args.no_progress)
      if result.get("status") == "preempted":
        return stopped_status(result)
      val = result.get("val", {})
      print(json.dumps({"mean_dice": val.get("mean_dice"), "dice": val.get("dice")}))
    elif args.command == "pretrain":
      from mfjax.ssl import pretrain
      config = load_config(args.config, _config_overrides(parser, rest))
      result = pretrain.run(config, args.workdir, progress=not args.no_progress)
      if result.get("status") == "preempted":
        return stopped_status(result)
      print(json.dumps({"backbone": result["backbone"], "steps": result["steps"]}))
    elif args.command == "report":
      if rest:
        parser.error(f"unrecognized arguments: {rest}")
      from mfjax import report
      written = report.build(args.runs_dir, args.out)  # a ReportError is a DataError: one line, exit 2
      print(f"report: {written['markdown']} and {written['html']}\n"
            f"{len(written['tables'])} tables in {os.path.dirname(written['markdown'])}/tables, "
            f"{len(written['plots'])} plots in {os.path.dirname(written['markdown'])}/plots")
      for note in written["notes"]:
        print(f"note: {note}")
  except (ConfigError, DataError, RunStopped, OSError) as e:  # the message names the key, file or reason
    logging.getLogger("mfjax").debug("the error's traceback", exc_info=True)
    kind = f"{type(e).__name__}: " if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else ""
    print(f"error: {kind}{e}", file=sys.stderr)
    return WORKDIR_BUSY if isinstance(e, WorkdirBusy) else 2 if isinstance(e, INPUT_MISTAKES) else 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
