"""Meshes, sharding rules and multi-host plumbing.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both; parameters and optimizer
state follow regex rules from the config (first match wins):
  replicate   a full copy on every device;
  fsdp        split the largest dimension divisible by the 'fsdp' axis size, when the tensor is
              at least `min_fsdp_bytes` (smaller ones stay replicated).
"""
import logging
import os
import re
import signal
import sys

import jax
import optax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mfjax.config import ConfigError, RunStopped

BATCH = ("data", "fsdp")
log = logging.getLogger("mfjax")


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """`jax.distributed.initialize` for multi-host runs.

  Explicit arguments win, then MFJAX_COORDINATOR / MFJAX_NUM_PROCESSES / MFJAX_PROCESS_ID (what
  launch/tpu.sh and launch/gpu.sh set). Under SLURM with several tasks, or with
  MFJAX_DISTRIBUTED=auto (e.g. on a multi-host Cloud TPU VM started by hand), JAX's own detection
  fills everything in. A single process does nothing, and neither does a second call (the runs of
  a sweep, one after another in the same processes).
  """
  if jax.distributed.is_initialized():
    return
  coordinator = coordinator or os.environ.get("MFJAX_COORDINATOR")
  if num_processes is None and "MFJAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["MFJAX_NUM_PROCESSES"])
  if process_id is None and "MFJAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["MFJAX_PROCESS_ID"])
  if coordinator:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("MFJAX_DISTRIBUTED") == "auto"
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0):
    jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; one size may be -1 (whatever is left)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  if data == -1 and fsdp == -1:
    raise ConfigError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
  if not all(isinstance(v, (int, np.integer)) and (v == -1 or v >= 1) for v in (data, fsdp)):
    raise ConfigError(f"mesh.data={data}, mesh.fsdp={fsdp}: each must be an int >= 1, or -1 (what is left)")
  given = (data, fsdp)
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data if data else 0
  if data * fsdp != n:
    raise ConfigError(f"mesh.data={given[0]} x mesh.fsdp={given[1]} does not divide the {n} device(s) into a grid: "
                      f"their product must be {n} (-1 takes what is left)")
  from jax.experimental import mesh_utils
  try:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices=list(devices.flat))
  except (AssertionError, ValueError, NotImplementedError):
    grid = devices.reshape(data, fsdp)
  return Mesh(grid, ("data", "fsdp"))


def path_str(path) -> str:
  """'a/b/c' for a jax tree path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def spec_for(shape, rule: str, mesh: Mesh, min_fsdp_bytes: int, itemsize: int = 4) -> P:
  if rule == "replicate" or not shape:
    return P()
  if rule != "fsdp":
    raise ValueError(f"unknown sharding rule {rule!r}; valid: replicate, fsdp")
  n = mesh.shape["fsdp"]
  if n == 1 or int(np.prod(shape)) * itemsize < min_fsdp_bytes:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, rules: list[tuple[str, str]], mesh: Mesh, min_fsdp_bytes: int = 1 << 20):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) from regex rules."""
  compiled = [(re.compile(rx), rule) for rx, rule in rules]

  def one(path, leaf):
    name = path_str(path)
    rule = next((r for rx, r in compiled if rx.search(name)), "replicate")
    shape = tuple(getattr(leaf, "shape", ()))
    # Sized as float32 at least: a bfloat16 first moment (optim.mu_dtype) is sharded like its
    # float32 parameter, not kept whole on every device when it falls under the threshold alone.
    itemsize = max(np.dtype(getattr(leaf, "dtype", np.float32)).itemsize, 4)
    return NamedSharding(mesh, spec_for(shape, rule, mesh, min_fsdp_bytes, itemsize))

  return jax.tree_util.tree_map_with_path(one, tree)


def optimizer_shardings(tx, opt_shapes, param_shardings, mesh: Mesh):
  """The optimizer state's shardings: every copy of the parameter tree in it (Adam's moments) as
  its parameters are, whatever `sharding_rules` matched them (a rule on "params/..." does not match
  "opt/1/mu/..."); everything else (the step count) replicated."""
  return optax.tree_map_params(tx, lambda _, sharding: sharding, opt_shapes, param_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(sharding, batch_size: int) -> np.ndarray:
  """The rows of a global batch of `batch_size` (split on its first axis by `sharding`, or over
  all axes of a Mesh) that this process's devices hold, in the order
  jax.make_array_from_process_local_data takes a process's rows. Consecutive shares in process
  order where the mesh follows jax.devices() (GPU hosts, CPU); interleaved on a TPU pod, whose
  mesh follows the chips' layout, so a process must fill these rows and not [p*n, (p+1)*n)."""
  if isinstance(sharding, Mesh):
    sharding = NamedSharding(sharding, P(sharding.axis_names))
  spans = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                  for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
  return np.concatenate([np.arange(start, stop) for start, stop in spans])


def put_global(tree, sharding):
  """Host values that every process holds in full (the same on each) as global jax.Arrays with
  `sharding` (one for every leaf): each process supplies the pieces of its own devices."""
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map(one, tree)


def on_process_zero(what: str, fn, *args, **kwargs):
  """`fn(*args, **kwargs)` run by process 0 alone, between two points every process passes together:
  none is still reading what process 0 changes, and a failure there stops every process (process 0
  raises its error, the others RunStopped naming `what`) instead of leaving them waiting in the
  next collective. Returns fn's result on process 0, None on the others."""
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("mfjax: before process 0 works alone")  # `what` may name a host's path
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - a Ctrl-C too: the others must not wait for it
      error = e
      log.error("could not %s: %s: %s", what, type(e).__name__, e)  # shown even if the broadcast fails
  failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
  if error is not None:
    raise error
  if failed:
    raise RunStopped(f"process 0 could not {what} (its output says why); this process stops too")
  return result


def gathered(value: int) -> np.ndarray:
  """Every process's integer `value`, in process order (one process: just its own)."""
  if jax.process_count() == 1:
    return np.array([value])
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def same_on_every_process(value: int) -> int:
  """Process 0's `value` (an integer each process found on its own, e.g. the newest step in a
  folder another job may be writing), so that every process goes on with the same one."""
  return int(gathered(value)[0])


class Preemption:
  """SIGTERM (or a first Ctrl-C) during a training loop, acted on by every process at the same step.

    preemption = parallel.Preemption().start()
    try:
      while ...:
        state = train_step(...); step += 1
        if preemption.due(step):
          save(); return
    finally:
      preemption.stop()

  Each process records its own SIGTERM. One process alone stops after the step it was signalled
  in. Several processes compare their flags every `every` steps (a small collective) and all
  stop together at the first comparison after any of them was signalled: a process that stopped
  alone would wait in the checkpoint's barrier while the others wait for it in the next step.
  Ctrl-C (SIGINT) is taken as SIGTERM, so an interrupted run keeps its steps; a second Ctrl-C
  stops at once (KeyboardInterrupt), losing the steps since the last checkpoint.
  """

  def __init__(self, every: int = 5):
    self.every = every
    self.received = False
    self.signal_name = ""
    self._previous = {}

  def start(self) -> "Preemption":
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def stop(self) -> None:
    """Put back the SIGTERM and SIGINT handlers there were before `start`."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, _frame):
    if signum == signal.SIGINT:
      if self.received:
        raise KeyboardInterrupt
      print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, losing "
            "the steps since the last checkpoint)", file=sys.stderr, flush=True)
    self.signal_name = self.signal_name or signal.Signals(signum).name
    self.received = True

  def stopped(self, step: int) -> dict:
    """What a training loop returns once it has saved `step` and stops: {"status": "preempted", "step"},
    with "signal": "SIGINT" when Ctrl-C asked for it (the command then exits 130, so a shell's `&&` or
    loop stops too; after SIGTERM, a preemption, it exits 0 and a launcher resumes it)."""
    log.warning("%s: saved the checkpoint at step %d; exiting so the run can resume", self.signal_name or "SIGTERM",
                step)
    return {"status": "preempted", "step": step, **({"signal": "SIGINT"} if self.signal_name == "SIGINT" else {})}

  def due(self, step: int) -> bool:
    """Whether to save and stop after `step`: the same answer on every process."""
    if jax.process_count() == 1:
      return self.received
    if step % self.every:
      return False
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(self.received))).any())
