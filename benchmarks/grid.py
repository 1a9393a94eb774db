r"""The train-step benchmark over the study's grid: every model family x protocol x resolution.

  PYTHONPATH=. python -m benchmarks.grid --out grid.jsonl [--models ...] [--protocols ...] [--res ...]
  PYTHONPATH=. python -m benchmarks.grid --list        # the commands, one per line, for a launcher

Each cell is one `python -m benchmarks.train_step` run in its own process (a fresh device, no
memory left over from the previous cell); its JSON row is appended to --out and the table of
every row is printed at the end. Resolutions: 224 for every model, plus the study's own (DINOv2
at 518; SAM at 1024; 1024 for all, the resolution study) unless --res is given. Cells that fail
(out of memory, say) are reported with the error and the grid goes on.
"""
import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys

from benchmarks.train_step import COLUMNS

# One model per family and per paper foundation.
MODELS = ("deit_base_patch16", "dino_vitb16", "dinov2_vitb14", "openclip_vitb16", "blip_vitb16",
          "seem_focalt", "resnet152", "sam_vitb", "dinov3_vitb16")
PROTOCOLS = ("frozen_linear", "frozen_deit", "unfrozen_linear", "unfrozen_deit", "progressive", "decapitation")


def resolutions(model: str) -> list[int]:
  """224, 1024 and the model's study resolution, each rounded down to a multiple of its patch size
  (DINOv2's 14 px patches: 1022 for "1024")."""
  from mfjax import models as registry
  patch = getattr(registry.create(model), "patch_size", 1)
  study = {"dinov2": 518, "sam": 1024}.get(model.split("_")[0])
  return sorted({r // patch * patch for r in {224, 1024} | ({study} if study else set())})


def cells(models, protocols, res):
  from mfjax import models as registry
  for model in models:
    if model not in registry.NAMES:
      print(f"skipping {model}: not a registered model in this checkout", file=sys.stderr)
      continue
    for r in res or resolutions(model):
      for protocol in protocols:
        yield model, protocol, r


def failure_message(returncode: int, stderr: str) -> str:
  """Why a cell's process failed: its exception line (not JAX's note on filtered frames that can
  follow it), else the signal that killed it or its exit status, with its last line of stderr."""
  lines = stderr.strip().splitlines()
  exception = next((l for l in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", l)), None)
  if exception:
    return exception[:300]
  if returncode < 0:
    name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
    cause = f"killed by {name}" + (" (the kernel's out-of-memory killer, most likely)" if name == "SIGKILL" else "")
  else:
    cause = f"exit status {returncode}" if returncode else "no JSON row printed"
  return f"{cause}; last stderr line: {lines[-1][:200] if lines else '(none)'}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=list(MODELS))
  parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS))
  parser.add_argument("--res", nargs="+", type=int, default=None, help="default: 224, 1024 and the study's")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--out", default="grid.jsonl")
  parser.add_argument("--list", action="store_true", help="print the commands instead of running them")
  args, passthrough = parser.parse_known_args(argv)  # e.g. --dtype bfloat16 --torch eager,compile
  for p in args.protocols:
    if p not in PROTOCOLS:
      parser.error(f"unknown protocol {p!r}; valid: {', '.join(PROTOCOLS)}")

  commands = []
  for model, protocol, res in cells(args.models, args.protocols, args.res):
    commands.append([sys.executable, "-m", "benchmarks.train_step", "--model", model, "--protocol", protocol,
                     "--res", str(res), "--batch", str(args.batch), "--out", args.out, *passthrough])
  if args.list:
    print("\n".join(shlex.join(c) for c in commands))
    return
  rows = []
  for i, command in enumerate(commands):
    print(f"[{i + 1}/{len(commands)}] {shlex.join(command[1:])}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode == 0 and lines:
      rows.append(json.loads(lines[-1]))
    else:
      error = failure_message(result.returncode, result.stderr)
      print(f"  failed: {error}", flush=True)
      failed = {"benchmark": "train_step", "model": command[4], "protocol": command[6], "res": command[8],
                "batch": args.batch, "error": error}
      rows.append(failed)
      with open(args.out, "a") as f:
        f.write(json.dumps(failed) + "\n")
  print()
  print("| " + " | ".join(h for h, _ in COLUMNS) + " |")
  print("|" + "---|" * len(COLUMNS))
  for row in rows:
    print("| " + " | ".join(str(row.get(k, row.get("error", "") if k == "jax_img_s" else "")) for _, k in COLUMNS)
          + " |")


if __name__ == "__main__":
  main()
