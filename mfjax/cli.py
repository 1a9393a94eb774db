"""`mfjax` command line: train, eval (and the benchmark commands as they land).

  mfjax train --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019,protocol=unfrozen_linear \
              --config.data.manual_dir=~/data/aptos2019 --workdir runs/x
  mfjax eval  --workdir runs/x [--split test]
  mfjax report runs/ [--out runs/report]
"""
import argparse
import ast
import importlib.util
import json
import logging
import os
import sys

import ml_collections

from mfjax.config import ConfigError

log = logging.getLogger("mfjax")


def load_config(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
  """`path/to/file.py[:args]` -> get_config(args), then `--config.a.b=value` overrides."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found")
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
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    if current is None:
      return value
    raise ConfigError(f"--config.{name}={value!r}: expected a {type(current).__name__}") from None
  if isinstance(current, bool) and not isinstance(parsed, bool):
    raise ConfigError(f"--config.{name}={value!r}: expected True or False")
  if isinstance(current, float) and isinstance(parsed, int):
    parsed = float(parsed)
  if current is not None and not isinstance(parsed, type(current)) and not (
      isinstance(current, (list, tuple)) and isinstance(parsed, (list, tuple))):
    raise ConfigError(f"--config.{name}={value!r}: expected a {type(current).__name__}")
  return parsed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="mfjax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("train", help="train one (model, dataset, protocol) cell")
  p.add_argument("--config", required=True, help="configs/FILE.py[:key=value,...]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--no-progress", action="store_true")
  p = sub.add_parser("eval", help="score a trained run's best checkpoint on a split")
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", default="test", choices=["train", "validation", "test"])
  p = sub.add_parser("report", help="tables and plots of a runs folder beside the paper's numbers")
  p.add_argument("runs_dir", help="folder searched for result.json, knn.json and cka_*.json")
  p.add_argument("--out", help="output folder (default RUNS_DIR/report)")
  args, rest = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    if args.command == "train":
      bad = [r for r in rest if not r.startswith("--config.")]
      if bad:
        parser.error(f"unrecognized arguments: {bad}")
      from mfjax.train import fit
      config = load_config(args.config, rest)
      result = fit.train(config, args.workdir, progress=not args.no_progress)
      if result.get("status") == "preempted":
        return 0
      print(json.dumps({"best_epoch": result["best_epoch"], "val": result["val"]["headline"],
                        "test": result["test"]["headline"], "metric": result["headline_metric"]}))
    elif args.command == "eval":
      if rest:
        parser.error(f"unrecognized arguments: {rest}")
      from mfjax.train import fit
      print(json.dumps(fit.evaluate_run(args.workdir, args.split), indent=2, default=float))
    elif args.command == "report":
      if rest:
        parser.error(f"unrecognized arguments: {rest}")
      from mfjax import report
      try:
        written = report.build(args.runs_dir, args.out)
      except report.ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
      print(f"report: {written['markdown']} and {written['html']}\n"
            f"{len(written['tables'])} tables in {os.path.dirname(written['markdown'])}/tables, "
            f"{len(written['plots'])} plots in {os.path.dirname(written['markdown'])}/plots")
      for note in written["notes"]:
        print(f"note: {note}")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
