r"""The GPU measurements of BENCHMARKS.md as one prepared run, sized for a short lease of a GPU
machine that has no package registry: its Python already holds jax, flax, optax, orbax, torch and
timm, and what mfjax needs beyond those travels as wheels.

Here, once (needs pip and the registry; writes .whl/, which git ignores):

  python -m benchmarks.gpu_suite --download .whl

There, one command (the wheels go to /tmp/site; every step's output lands in --out-dir):

  PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --wheels .whl --out-dir $OUT --budget-s 500

(a device call with timeout_s 590: the lease's 15 minutes hold one machine start and one such call).

Steps, in order of importance (`--steps` picks some): the environment and an import check (fails
in seconds if a package is missing), then ViT-B/16 at 224 in bf16 against timm with torch.compile
and autocast (the MFU and 1.2x targets), SAM ViT-B at 1024 with remat against segment_anything's
encoder, the bf16 / cuDNN attention / bf16 first-moment ablation, MedDINOv3's segmentation
step at 512 px in bf16 against timm + PatchDecode with torch.compile, and the sliding window's
host time per 512-px slice (`window_host`: is validation bound by the host?). Each step runs as its own
process with its own timeout, capped by what is left of --budget-s; a step that fails or runs out
of time is reported and the next one still runs. The benchmarks append their JSON rows to
OUT_DIR/gpu.jsonl; each step's full output is in OUT_DIR/STEP.log; a summary table (with its JSON lines) comes last.

`--tiny` runs the same steps on tiny cells (a few blocks, small images, batch 2, torch eager): on a
CPU it checks in a minute that every step's command line is accepted (tests/test_benchmarks.py).
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import time

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What mfjax and the benchmarks import that the GPU machine's image lacks (its package list:
# /work/.library/device/KINDS.md), pinned to the versions the test environment runs.
WHEELS = (
    "tensorflow-datasets==4.9.10", "tensorflow-metadata==1.21.0", "googleapis-common-protos==1.76.0",
    "array-record==0.8.6", "grain==0.2.18", "dm-tree==0.1.10", "immutabledict==4.3.1", "promise==2.3",
    "toml==0.10.2", "termcolor==3.3.0", "simple-parsing==0.1.9", "docstring-parser==0.18.0",
    "portpicker==1.6.0", "ml-collections==1.1.0", "pydicom==3.0.2", "tensorboardX==2.6.5",
    "segment-anything==1.0",
    # The versions the suite passes with, in place of the image's own (its flax, timm or protobuf may be
    # outside mfjax's ranges: tensorflow-metadata's generated code needs protobuf >= 6.31).
    "flax==0.12.8", "optax==0.2.8", "timm==1.0.31", "protobuf==7.36.2",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
IMPORTS = ("jax", "flax", "optax", "orbax.checkpoint", "torch", "timm", "segment_anything", "tensorflow_datasets",
           "grain", "array_record", "ml_collections", "mfjax.data", "mfjax.train.fit", "mfjax.train.segment",
           "benchmarks.torch_reference")

SAM_1024 = ("--config.model.remat=True", "--config.model.overrides.global_query_chunk_rows=8")
STEPS = (
    # name, benchmark module, arguments, the longest it may take (s)
    ("vitb16_bf16", "train_step", ("--model", "deit_base_patch16", "--protocol", "unfrozen_linear", "--res", "224",
                                   "--batch", "128", "--dtype", "bfloat16", "--torch", "eager,compile"), 180),
    ("sam1024_remat", "train_step", ("--model", "sam_vitb", "--protocol", "unfrozen_linear", "--res", "1024",
                                     "--batch", "8", "--dtype", "bfloat16", "--torch", "eager", *SAM_1024), 150),
    ("vitb16_ablate", "ablate", ("--model", "deit_base_patch16", "--res", "224", "--batch", "128", "--no-torch",
                                 "--min-seconds", "0.5",
                                 "--variant", "fp32=--config.model.dtype=float32",
                                 "--variant", "bf16=--config.model.dtype=bfloat16",
                                 "--variant", "bf16_cudnn=--config.model.dtype=bfloat16 "
                                              "--config.model.overrides.attn_impl=cudnn",
                                 "--variant", "bf16_mu=--config.model.dtype=bfloat16 --config.optim.mu_dtype=bfloat16"),
     120),
    ("segment512_bf16", "segment_step", ("--patch", "512", "--batch", "16", "--dtype", "bfloat16",
                                         "--torch", "eager,compile"), 120),
    ("window512", "window_host", ("--size", "512", "--patch", "512", "--classes", "16", "--slices", "64",
                                  "--batch", "16", "--mirror"), 60),
)
STEP_NAMES = ("env",) + tuple(name for name, *_ in STEPS)
TINY_MODEL_ARGS = ("--config.model.overrides.num_blocks=2",)
TINY_SEGMENT_ARGS = ("--config.model.overrides.num_blocks=4", "--config.model.interaction_indices=(0,1,2,3)")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--download", metavar="DIR", help="fetch the wheels for the GPU machine into DIR and stop")
  parser.add_argument("--python-version", default="3.12", help="--download: the GPU machine's Python")
  parser.add_argument("--wheels", metavar="DIR", help="install DIR/*.whl into --site first (no registry needed)")
  parser.add_argument("--site", default="/tmp/site", help="where --wheels installs (put first on PYTHONPATH)")
  parser.add_argument("--out-dir", default=os.environ.get("OUT", "gpu_out"))
  parser.add_argument("--steps", default=",".join(STEP_NAMES), help=f"comma list of {', '.join(STEP_NAMES)}")
  parser.add_argument("--budget-s", type=float, default=500.0, help="wall time for all steps together")
  parser.add_argument("--tiny", action="store_true", help="tiny cells: check the command lines on any machine")
  args = parser.parse_args(argv)
  args.steps = [s for s in args.steps.split(",") if s]
  unknown = [s for s in args.steps if s not in STEP_NAMES]
  if unknown:
    parser.error(f"unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEP_NAMES)}")
  return args


def download(folder: str, python_version: str) -> None:
  """Each wheel for the GPU machine's Python; a package published only as source (promise) is built
  into a wheel here, which works there only when it is pure Python (checked by its tag)."""
  os.makedirs(folder, exist_ok=True)
  for name in os.listdir(folder):  # two versions of one package stop the whole install there
    if name.endswith(".whl") and not any(_wheel_matches(name, w) for w in WHEELS):
      os.remove(os.path.join(folder, name))
  binary = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            python_version, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", folder]
  for requirement in WHEELS:
    if subprocess.run(binary + [requirement], capture_output=True).returncode != 0:
      subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder, requirement], check=True)
  names = sorted(n for n in os.listdir(folder) if n.endswith(".whl"))
  missing = [w for w in WHEELS if not any(_wheel_matches(n, w) for n in names)]
  if missing:
    raise SystemExit(f"no wheel for {', '.join(missing)} in {folder}")
  tags = r"-(py3|py2\.py3)-none-any\.whl$|-abi3-|-cp" + python_version.replace(".", "") + "-"
  built_here = [n for n in names if not re.search(tags, n)]
  if built_here:
    raise SystemExit(f"{', '.join(built_here)}: built for this machine's Python, not {python_version}")
  size = sum(os.path.getsize(os.path.join(folder, n)) for n in names)
  print(f"{len(names)} wheels, {size / 2**20:.1f} MiB in {folder} (the device tool carries 64 MiB in all)")


def _wheel_matches(filename: str, requirement: str) -> bool:
  name, version = requirement.split("==")
  normalized = re.sub(r"[-_.]+", "_", name).lower()
  return filename.lower().startswith(f"{normalized}-{version}-")


def install(folder: str, site: str) -> None:
  names = os.listdir(folder) if os.path.isdir(folder) else []
  wheels = sorted(os.path.join(folder, n) for n in names if n.endswith(".whl"))
  if not wheels:
    raise SystemExit(f"no .whl files in {folder}: run `python -m benchmarks.gpu_suite --download {folder}` here first")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--no-cache-dir", "--upgrade", "--target", site, *wheels], check=True)


def step_command(module: str, arguments: tuple, out_dir: str, tiny: bool) -> list[str]:
  arguments = list(arguments)
  if tiny:
    arguments = tiny_arguments(arguments, module)
  return [sys.executable, "-m", f"benchmarks.{module}", *arguments, "--out", os.path.join(out_dir, "gpu.jsonl")]


def tiny_arguments(arguments: list[str], module: str = "train_step") -> list[str]:
  """The same command on a tiny cell: 2 blocks (the segmentation step 4, its decoder reading each,
  on 64-px patches), 32-px images, batch 2, one quick round, torch eager, float32
  (torch's bf16 on a CPU is slow) and XLA's attention instead of cuDNN's."""
  replace = {"--res": "32", "--patch": "64", "--batch": "2", "--torch": "eager", "--dtype": "float32",
             "--size": "96", "--slices": "4"}
  out = [replace.get(prev, a) if prev in replace else a for prev, a in zip([None] + arguments[:-1], arguments)]
  if module == "window_host":
    return out + ["--rounds", "1"]
  out = [("--config.model.overrides.global_query_chunk_rows=1" if a.startswith("--config.model.overrides.global_query")
          else a.replace("attn_impl=cudnn", "attn_impl=xla")) for a in out]
  if "--min-seconds" in out:
    out[out.index("--min-seconds") + 1] = "0"
  else:
    out += ["--min-seconds", "0"]
  if "--variant" in out:  # ablate: each variant carries the overrides
    out = [a + " " + " ".join(TINY_MODEL_ARGS) if prev == "--variant" else a
           for prev, a in zip([None] + out[:-1], out)]
    return out + ["--rounds", "1"]
  if module == "segment_step":
    return out + list(TINY_SEGMENT_ARGS) + ["--rounds", "1"]
  return out + list(TINY_MODEL_ARGS) + ["--rounds", "1", "--no-rss"]


def env_check(env: dict) -> tuple[int, str]:
  """Versions, devices and every import the steps need; rc 1 names what is missing."""
  code = ("import importlib, sys\n"
          "missing = []\n"
          f"for name in {IMPORTS!r}:\n"
          "  try:\n"
          "    importlib.import_module(name)\n"
          "  except Exception as e:\n"
          "    missing.append(f'{name}: {type(e).__name__}: {e}')\n"
          "import jax, torch, flax, optax, timm, google.protobuf, orbax.checkpoint\n"
          "print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__,"
          " '| optax', optax.__version__, '| orbax', orbax.checkpoint.__version__, '| torch', torch.__version__,"
          " '| timm', timm.__version__, '| protobuf', google.protobuf.__version__)\n"
          "for model in ('vit_base_patch16_dinov3', 'vit_base_patch16_224'):\n"
          "  if not timm.is_model(model): missing.append(f'timm {timm.__version__} has no {model}')\n"
          "print('jax devices:', jax.devices())\n"
          "print('torch cuda:', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available()"
          " else '')\n"
          # MFU needs the FLOP count; the CUDA plugin's Lowered.cost_analysis() gives none (common.cost_flops)
          "import jax.numpy as jnp\n"
          "from benchmarks import common\n"
          "lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16)))\n"
          "flops = common.cost_flops(lowered.compile(), lowered)\n"
          "print('FLOPs of a 64x32 @ 32x16 matmul:', flops)\n"
          "if flops != 2 * 64 * 32 * 16: missing.append(f'the FLOP count (got {flops}): no MFU')\n"
          "for m in missing: print('MISSING', m)\n"
          "sys.exit(1 if missing else 0)\n")
  try:
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  except subprocess.TimeoutExpired as e:
    return 1, f"the environment check ran past 300 s\n{e.stdout or ''}{e.stderr or ''}"
  return proc.returncode, proc.stdout + proc.stderr[-2000:]


def run_step(name: str, command: list[str], env: dict, timeout: float, out_dir: str) -> dict:
  log_path = os.path.join(out_dir, f"{name}.log")
  start = time.monotonic()
  with open(log_path, "w") as log:
    log.write("$ " + shlex.join(command) + "\n")
    log.flush()
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
      rc = proc.wait(timeout=timeout)
      status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
      proc.terminate()  # a Python traceback in the log says where it was; then it goes for good
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      status = f"timed out after {timeout:.0f} s"
  seconds = time.monotonic() - start
  text = open(log_path, errors="replace").read()
  rows = [line for line in text.splitlines() if line.startswith("|")]
  # A step stopped at its cap leaves no row, but each side's step time after its warm-up (common.warm_up).
  step_times = "; ".join(line.replace(": one call ", " ").replace(" after warm-up", "")
                         for line in text.splitlines() if ": one call " in line)
  print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
  print("\n".join(rows) if rows and status == "ok" else "\n".join(text.splitlines()[-25:]), flush=True)
  return {"step": name, "status": status, "seconds": f"{seconds:.0f}", "step_times": step_times}


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.download:
    download(args.download, args.python_version)
    return 0
  os.makedirs(args.out_dir, exist_ok=True)
  # One persistent compilation cache for every step: a program one step compiled is read, not compiled
  # again, by a later step that builds the same one (and by a rerun of the suite on the same machine).
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=os.path.join(args.out_dir, ".jax_cache")
             if args.tiny else "/tmp/mfjax_jax_cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  pythonpath = [ROOT]
  if args.wheels:
    install(args.wheels, args.site)
    pythonpath.insert(0, args.site)
  env["PYTHONPATH"] = os.pathsep.join(pythonpath + [p for p in [os.environ.get("PYTHONPATH")] if p])
  deadline = time.monotonic() + args.budget_s
  results = []
  if "env" in args.steps:
    start = time.monotonic()
    rc, text = env_check(env)
    print("== env\n" + text.strip(), flush=True)
    open(os.path.join(args.out_dir, "env.log"), "w").write(text)
    results.append({"step": "env", "status": "ok" if rc == 0 else "failed (imports)",
                    "seconds": f"{time.monotonic() - start:.0f}"})
    if rc:
      print("stopping: the steps would fail on the imports above")
      return 1
  for name, module, arguments, longest in STEPS:
    if name not in args.steps:
      continue
    left = deadline - time.monotonic()
    if left < min(longest, 60) and not args.tiny:  # a step that cannot get its warm-up done is not started
      results.append({"step": name, "status": f"skipped ({max(round(left), 0)} s of the budget left)", "seconds": "0"})
      continue
    command = step_command(module, arguments, args.out_dir, args.tiny)
    results.append(run_step(name, command, env, min(longest, max(left, 1)), args.out_dir))
  # The summary goes to gpu.jsonl too: it survives an outer limit that stops this process later.
  common.emit([{"benchmark": "gpu_suite", **r} for r in results],
              [("step", "step"), ("status", "status"), ("s", "seconds"), ("step time (s)", "step_times")],
              os.path.join(args.out_dir, "gpu.jsonl"))
  return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
