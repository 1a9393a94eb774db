"""Orbax checkpoints of a run: `latest` (train state + host state, for resuming) and `best`.

The host state is JSON: epoch, position in the epoch, the data iterator's state, the plateau
rule, the best validation metric so far. Saves are finished before the call returns, so a
SIGKILL right after leaves a complete checkpoint, and orbax's temporary-then-rename protocol
means a SIGKILL during a save leaves the previous one intact.
"""
import jax
import orbax.checkpoint as ocp
from etils import epath

from mfjax import parallel
from mfjax.train import lock


class RunCheckpoints:
  # The owners' open checkpoints, by workdir: `close_owned` closes them when a run ends on an error.
  _owned: dict[str, "RunCheckpoints"] = {}

  def __init__(self, workdir, owner: bool = False):
    """`workdir`: a local path or a remote one orbax can write (gs://, through tensorstore).
    `owner`: the job that trains in it (holding its lock) deletes what a save killed midway left;
    a reader (eval, CKA, another run's stage 2) must not: that may be a save in progress."""
    self.workdir = epath.Path(workdir)
    self.owner = owner
    self.latest = ocp.CheckpointManager(self.workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, cleanup_tmp_directories=owner), item_names=("state", "host"))
    self._best = None
    if owner:
      RunCheckpoints._owned[str(self.workdir)] = self

  @classmethod
  def close_owned(cls, workdir) -> None:
    """Close the owner's checkpoints of `workdir` if still open. Left open at exit, orbax's cleanup
    thread prints a traceback after the error that ended the run."""
    ckpts = cls._owned.get(str(epath.Path(workdir)))
    if ckpts is not None:
      ckpts.close()

  @property
  def best(self) -> ocp.CheckpointManager:
    """The `best` manager, made (and its folder created) on first use: pretraining has none. It keeps
    every step until `keep_best_only`: a new best saved before the `latest` checkpoint that records it
    must not delete the best that the latest one records (a kill in between resumes from there)."""
    if self._best is None:
      self._best = ocp.CheckpointManager(self.workdir / "best", options=ocp.CheckpointManagerOptions(
          max_to_keep=None, create=True, cleanup_tmp_directories=self.owner), item_names=("params", "host"))
    return self._best

  def keep_best_only(self, step: int | None) -> None:
    """Delete the best checkpoints other than `step` (the one the latest checkpoint records)."""
    for other in self.best.all_steps():
      if other != step:
        self.best.delete(other)

  def drop_best_after(self, step: int) -> None:
    """On resuming at `step`: delete best checkpoints saved after it, which the run will redo."""
    for other in self.best.all_steps():
      if other > step:
        self.best.delete(other)

  @staticmethod
  def _newest(manager: ocp.CheckpointManager) -> int | None:
    """The newest step, as process 0 found it: a run read while another job writes it (`mfjax eval` of
    a running run, a stage 2 started from a live stage 1) gives every process the same checkpoint."""
    step = parallel.same_on_every_process(-1 if manager.latest_step() is None else manager.latest_step())
    return None if step < 0 else step

  def save_latest(self, step: int, state, host: dict) -> None:
    if self.owner:
      lock.check_still_held(self.workdir)
    if step in self.latest.all_steps():  # nothing new: a resumed run's first save can be the one it resumed from
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   host=ocp.args.JsonSave(host)), force=True)
    self.latest.wait_until_finished()

  def restore_latest(self, abstract_state):
    """(state, host) of the latest checkpoint, placed like `abstract_state`; None if there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
    return out["state"], out["host"]

  def restore_latest_as_saved(self, sharding):
    """(step, state) of the latest checkpoint with the tree and shapes it was saved with (no template
    needed: another run's), every array placed with `sharding`; None if there is none."""
    step = self._newest(self.latest)
    if step is None:
      return None
    directory = self.workdir / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
      saved = checkpointer.metadata(directory).item_metadata.tree
      abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)
      return step, checkpointer.restore(directory, abstract)

  def save_best(self, step: int, params, host: dict, replace: bool = False) -> None:
    """Keeps an existing checkpoint of `step` unless `replace`: a run killed while saving `latest`
    at the end of an epoch redoes that epoch on restart, and reaches the same best step again
    with the same parameters."""
    if self.owner:
      lock.check_still_held(self.workdir)
    if step in self.best.all_steps():
      if not replace:
        return
      self.best.delete(step)
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 host=ocp.args.JsonSave(host)), force=True)
    self.best.wait_until_finished()

  def restore_best(self, abstract_params, step: int | None = None):
    """(params, host) of best checkpoint `step` (default: the newest); None if there is none."""
    step = self._newest(self.best) if step is None else step
    if step is not None and step not in self.best.all_steps():
      self.best.reload()  # listed by process 0 after this process listed the folder (a run still training)
    if step is None or not parallel.gathered(step in self.best.all_steps()).all():  # a step deleted meanwhile
      return None
    out = self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), host=ocp.args.JsonRestore()))
    return out["params"], out["host"]

  def close(self):
    if RunCheckpoints._owned.get(str(self.workdir)) is self:
      del RunCheckpoints._owned[str(self.workdir)]
    self.latest.close()
    if self._best is not None:
      self._best.close()
