"""`python -m convert FAMILY --checkpoint PATH --out DIR [--format auto|original|hf] [options]`.

Reads a released PyTorch checkpoint (file, Hugging Face folder or Hub id), converts it with the
family's strict key mapping and writes an orbax checkpoint plus model.json to --out. Nothing is
written unless the whole conversion succeeds.
"""
import argparse
import importlib
import os
import sys
import time

from convert import core

# CLI family -> converter module. Each module defines FORMATS, add_arguments(parser),
# from_checkpoint(raw, hf_config, fmt, args) -> (model name, overrides, variables), and may define
# ORIGINAL_FILES: names of its original-format files in Hub repos and folders (core.read_checkpoint).
FAMILIES = {
    "deit": "convert.deit",
    "dino": "convert.dino",
    "dinov2": "convert.dinov2",
    "openclip": "convert.openclip",
    "blip": "convert.blip",
    "seem": "convert.seem",
    "resnet": "convert.resnet",
    "sam": "convert.sam",
    "dinov3": "convert.dinov3",
}


def build_parser(family: str | None = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("family", choices=sorted(FAMILIES), help="model family of the checkpoint")
  parser.add_argument("--checkpoint", required=True,
                      help="checkpoint file (.pth/.pt/.bin/.safetensors), Hugging Face model folder, "
                           "or Hugging Face Hub id (e.g. facebook/dinov2-base; needs network)")
  parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
  parser.add_argument("--format", default="auto", choices=["auto", "original", "hf"],
                      help="checkpoint format; auto: a folder with config.json is 'hf', a file 'original'")
  if family in FAMILIES:
    importlib.import_module(FAMILIES[family]).add_arguments(parser)
  return parser


def run(argv: list[str]) -> str:
  family = next((a for a in argv if a in FAMILIES), None)  # anywhere: its flags are then known wherever they are
  args = build_parser(family).parse_args(argv)
  module = importlib.import_module(FAMILIES[args.family])
  if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
    raise core.ConversionError(f"--out {args.out} already exists and is not empty; choose a new folder")

  start = time.time()
  raw, hf_config, resolved = core.read_checkpoint(args.checkpoint, args.format,
                                                  getattr(module, "ORIGINAL_FILES", ()))
  fmt = "hf" if hf_config is not None else "original"
  if args.format != "auto" and args.format != fmt:
    raise core.ConversionError(f"--format {args.format} given, but {resolved} is a "
                               f"{'Hugging Face folder' if fmt == 'hf' else 'checkpoint file'} ({fmt})")
  if fmt not in module.FORMATS:
    raise core.ConversionError(f"{args.family} converter reads formats {module.FORMATS}, not {fmt}")
  name, overrides, variables = module.from_checkpoint(raw, hf_config, fmt, args)

  from mfjax import models
  provenance = {"checkpoint": os.path.abspath(resolved) if os.path.exists(resolved) else resolved,
                "family": args.family, "format": fmt,
                "options": {k: v for k, v in vars(args).items()
                            if k not in ("family", "checkpoint", "out", "format")}}
  models.save(args.out, name, variables, overrides, provenance)
  n = sum(x.size for x in __import__("jax").tree_util.tree_leaves(variables))
  print(f"converted {resolved} ({args.family}, {fmt}) -> {args.out}: model {name}, "
        f"{n / 1e6:.1f}M parameters, {time.time() - start:.1f}s")
  return args.out


def main(argv=None) -> int:
  try:
    run(sys.argv[1:] if argv is None else argv)
  except core.ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
