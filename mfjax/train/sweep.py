"""`mfjax sweep`: a grid of training runs, one workdir each, with the paper's learning-rate selection.

A sweep file defines `get_sweep(arg) -> dict` with
  config   the config file every run uses (e.g. "configs/paper.py")
  axes     {name: [values]}: a config argument (model, dataset, protocol, lr, seed, res, ...) or a
           dotted config field (e.g. "protocol.unfreeze_from"); the grid is their product
  fixed    {dotted field: value} applied to every run
  data_root        optional: data.manual_dir = <data_root>/<dataset> for each run
  checkpoint_root  optional: model.checkpoint = <root>/<model> and, for stacked heads,
                   head.checkpoint = <root>/deit_base_patch16 (folders from `python -m convert`)
  per_model        optional {model: {dotted field: value}} for the runs of that model
  per_dataset      optional {dataset: {dotted field: value}} for the runs of that dataset (its build
                   options, e.g. {"cbis_ddsm": {"data.options.layout": "lists"}})
Runs live in RUNS_DIR/<cell>/lr=<lr>/seed=<seed>, where the cell is every axis but lr and seed.
A run with result.json is skipped (its config must be the sweep's); an interrupted one resumes from
its checkpoint; one that another job trains (its lock.json, mfjax.train.lock) is left to it, so
sweeps on several machines can share one runs folder. A run whose loss turns non-finite gets a
result.json with status "diverged" and the sweep goes on. For each cell the learning rate with the
best mean validation metric over seeds is selected (selection.json), as the report selects it: an
lr with a diverged or non-finite seed is not.
"""
import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import shlex

from etils import epath

from mfjax.config import ConfigError, to_dict
from mfjax.train import lock, protocols

log = logging.getLogger("mfjax")
SELECTED_BY = ("lr", "seed")


@dataclasses.dataclass
class Run:
  cell: str
  cell_dir: str
  workdir: str
  config_spec: str        # "configs/paper.py:model=...,lr=..."
  overrides: list[str]    # ["--config.protocol.unfreeze_from=3", ...]
  values: dict

  def finished(self) -> bool:
    return (epath.Path(self.workdir) / "result.json").exists()

  def command(self) -> str:
    return shlex.join(["mfjax", "train", "--config", self.config_spec, *self.overrides,
                       "--workdir", self.workdir])


def load_sweep(spec: str):
  from mfjax.cli import resolve_config_file
  path, _, arg = spec.partition(":")
  path = resolve_config_file(path)
  module_spec = importlib.util.spec_from_file_location("mfjax_user_sweep", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"{path} defines no get_sweep(arg)")
  return module.get_sweep(arg)


def _fmt(v) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def join(*parts) -> str:
  """os.path.join that keeps a URL's scheme (gs://bucket/...) intact."""
  return str(epath.Path(parts[0]).joinpath(*parts[1:])) if "://" in str(parts[0]) else os.path.join(*parts)


def expand(sweep, runs_dir: str, extra_overrides: list[str] = ()) -> list[Run]:
  """Every run of the grid, in a stable order (cell by cell, then lr, then seed)."""
  axes = dict(sweep["axes"])
  runs_dir = str(runs_dir) if "://" in str(runs_dir) else os.path.expanduser(str(runs_dir))  # --runs-dir=~/...
  cell_axes = [a for a in axes if a not in SELECTED_BY]
  order = cell_axes + [a for a in SELECTED_BY if a in axes]
  fixed = [f"--config.{k}={v}" for k, v in sweep.get("fixed", {}).items()] + list(extra_overrides)
  runs = []
  for combo in itertools.product(*(list(axes[a]) for a in order)):
    values = dict(zip(order, combo))
    args = [f"{a}={_fmt(v)}" for a, v in values.items() if "." not in a]
    dotted = [f"--config.{a}={_fmt(v)}" for a, v in values.items() if "." in a]
    dotted += _per_run_paths(sweep, values)
    cell = ",".join(f"{a}={_fmt(values[a])}" for a in cell_axes) or "all"
    sub = [f"{a}={_fmt(values[a])}" for a in SELECTED_BY if a in values]
    cell_dir = join(runs_dir, cell)
    runs.append(Run(cell, cell_dir, join(cell_dir, *sub), f"{sweep['config']}:{','.join(args)}",
                    fixed + dotted, values))
  return runs


def _per_run_paths(sweep, values) -> list[str]:
  out = []
  if sweep.get("data_root") and "dataset" in values:
    out.append(f"--config.data.manual_dir={os.path.join(sweep['data_root'], values['dataset'])}")
  if sweep.get("checkpoint_root"):
    if "model" in values:
      out.append(f"--config.model.checkpoint={os.path.join(sweep['checkpoint_root'], values['model'])}")
    protocol = str(values.get("protocol", ""))
    head = values.get("protocol.head", sweep.get("fixed", {}).get("protocol.head"))
    if protocols.head_of(protocol, head) == "deit":  # progressive takes its head from protocol.head
      out.append(f"--config.head.checkpoint={os.path.join(sweep['checkpoint_root'], 'deit_base_patch16')}")
  for per, axis in (("per_model", "model"), ("per_dataset", "dataset")):
    for key, value in sweep.get(per, {}).get(values.get(axis), {}).items():
      out.append(f"--config.{key}={_fmt(value)}")
  return out


def run_all(sweep, runs_dir: str, extra_overrides: list[str] = (), progress: bool = True) -> dict:
  """Train every unfinished run in turn on the local devices, then select learning rates."""
  from mfjax import parallel
  from mfjax.cli import load_config
  from mfjax.train import fit
  parallel.maybe_initialize_distributed()  # before the checks below start JAX (process_index)
  runs = expand(sweep, runs_dir, extra_overrides)
  configs = [load_config(r.config_spec, r.overrides) for r in runs]  # every config checked up front
  datasets = {}
  for run, config in zip(runs, configs):
    if run.finished():  # counts only if it ran this sweep's config and data (not before a change or a rebuild)
      fit.check_workdir(run.workdir, to_dict(config))
      data = json.dumps(to_dict(config.data), sort_keys=True)
      if data not in datasets:
        datasets[data] = fit.open_dataset(config)
      fit.check_data_build(run.workdir, datasets[data])
  # As process 0 sees it: another sweep on this runs folder may finish a run while the processes look.
  todo = [(r, c) for r, c in zip(runs, configs) if not parallel.same_on_every_process(int(r.finished()))]
  log.info("sweep: %d runs, %d finished, %d to go", len(runs), len(runs) - len(todo), len(todo))
  held_elsewhere = []
  for i, (run, config) in enumerate(todo):
    log.info("sweep run %d/%d: %s", i + 1, len(todo), run.workdir)
    try:
      result = fit.train(config, run.workdir, progress=progress, record_divergence=True)
    except lock.WorkdirBusy as e:  # another sweep over this runs folder trains it
      log.warning("sweep run %d/%d skipped: %s", i + 1, len(todo), e)
      held_elsewhere.append(run.workdir)
      continue
    if result.get("status") == "preempted":
      log.warning("sweep stopped by %s; run it again to resume", result.get("signal", "SIGTERM"))
      return {k: v for k, v in result.items() if k != "step"}
  selections = select(runs)
  unfinished = [w for w in held_elsewhere if not (epath.Path(w) / "result.json").exists()]
  if unfinished:  # a launcher must not start this sweep again at once: it would skip them again
    raise lock.WorkdirBusy(f"this sweep trained the rest; {len(unfinished)} run(s) other jobs train are not finished "
                           f"({', '.join(unfinished[:5])}{', ...' if len(unfinished) > 5 else ''}): run the sweep "
                           "again when they end, to select over every run")
  return selections


def select(runs: list[Run]) -> dict:
  """Per cell: the report's choice (results.group_cells): the lr with the best mean validation headline
  over its seeds, and that lr's test mean and sample std; with the seeds found and expected per lr."""
  from mfjax import parallel
  from mfjax.report import results
  expected: dict = {}
  found: dict = {}
  for run in runs:
    expected.setdefault(run.cell, {}).setdefault(run.values.get("lr"), 0)
    expected[run.cell][run.values.get("lr")] += 1
    path = epath.Path(run.workdir) / "result.json"
    if path.exists():
      found.setdefault(run.cell, []).append((run, str(path), json.loads(path.read_text())))
  selections = {}
  for cell, items in found.items():
    try:
      grouped = results.group_cells([results.read_run(path, data) for _, path, data in items])
    except results.ReportError as e:
      raise ConfigError(f"sweep cell {cell}: {e}") from None
    if len(grouped) > 1:  # the sweep's runs of one cell share its config: these were started from other configs
      raise ConfigError(f"sweep cell {cell}: its runs' configs differ beyond lr and seed ("
                        f"{' | '.join(c.setting for c in grouped)}), e.g. {grouped[0].files[0]} and "
                        f"{grouped[1].files[0]}")
    (chosen,) = grouped
    diverged = sorted(run.workdir for run, _, data in items if data.get("status") == "diverged")
    seeds_by_lr = {_fmt(lr): n for lr, (_, n) in chosen.lr_scores.items()}
    # Without an lr axis every run has the config's lr: the one the results give.
    expected[cell] = {_fmt(chosen.lr if lr is None else lr): n for lr, n in expected[cell].items()}
    selections[cell] = {
        "lr": chosen.lr, "val_mean_by_lr": {_fmt(lr): score for lr, (score, _) in chosen.lr_scores.items()},
        "test_mean": chosen.mean, "test_std": chosen.std, "seeds": chosen.n, "seeds_by_lr": seeds_by_lr,
        "expected_seeds_by_lr": expected[cell], "diverged": diverged, "headline_metric": chosen.metric}
    missing = {lr: n - seeds_by_lr.get(lr, 0) for lr, n in expected[cell].items() if seeds_by_lr.get(lr, 0) < n}
    if missing or diverged:
      log.warning("sweep cell %s: lr %g selected; %s%s", cell, chosen.lr,
                  f"runs not finished per lr: {missing}; " if missing else "",
                  f"{len(diverged)} run(s) diverged" if diverged else "")
    path = epath.Path(items[0][0].cell_dir) / "selection.json"
    parallel.on_process_zero(f"write {path}", path.write_text, json.dumps(selections[cell], indent=2, default=float))
  return selections
