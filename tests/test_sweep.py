"""`mfjax sweep`: grid expansion, runs, skipping finished runs, learning-rate selection."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mfjax import data as mdata
from mfjax.cli import load_config
from mfjax.config import ConfigError
from mfjax.data import synthetic
from mfjax.train import lock
from mfjax.train import sweep as msweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP = '''
def get_sweep(arg=""):
  return dict(config="configs/tiny.py",
              axes={"model": ["deit_base_patch16"], "dataset": ["aptos2019"], "protocol": ["frozen_linear"],
                    "lr": [1e-4, 3e-3], "seed": [0, 1]},
              fixed={"epochs": 1, "data.data_dir": "%s"}, data_root="%s")
'''


@pytest.fixture(scope="module")
def setup(module_tmp):
  tmp = module_tmp.mktemp("sweep")
  synthetic.aptos2019(str(tmp / "downloads" / "aptos2019"), num_images=48, size=40)
  mdata.build("aptos2019", str(tmp / "downloads" / "aptos2019"), str(tmp / "data"))
  path = tmp / "tiny_sweep.py"
  path.write_text(SWEEP % (tmp / "data", tmp / "downloads"))
  return tmp, str(path)


def test_expand_names_cells_and_overrides(setup):
  tmp, path = setup
  runs = msweep.expand(msweep.load_sweep(path), str(tmp / "runs"))
  assert len(runs) == 4 and len({r.workdir for r in runs}) == 4
  assert {r.cell for r in runs} == {"model=deit_base_patch16,dataset=aptos2019,protocol=frozen_linear"}
  assert runs[0].workdir.endswith(os.path.join("lr=0.0001", "seed=0"))
  assert f"--config.data.manual_dir={tmp / 'downloads' / 'aptos2019'}" in runs[0].overrides
  assert "--config.epochs=1" in runs[0].overrides
  home = msweep.expand(msweep.load_sweep(path), "~/runs")  # bash leaves --runs-dir=~/runs as it is
  assert home[0].workdir.startswith(os.path.join(os.path.expanduser("~"), "runs", ""))


def test_paper_sweep_passes_each_downloads_build_options_to_its_runs_only():
  """The paper's DDSM image lists and a frontal-only CheXpert are build options of one dataset each;
  by default no run gets any (the runs of an earlier sweep keep their config)."""
  spec = "configs/sweeps/paper.py:models=deit_base_patch16,protocols=frozen_linear,seeds=1"
  options = lambda run: [o for o in run.overrides if o.startswith("--config.data.options.")]
  assert not any(options(r) for r in msweep.expand(msweep.load_sweep(spec), "runs"))
  runs = msweep.expand(msweep.load_sweep(spec + ",cbis_layout=lists,chexpert_views=frontal"), "runs")
  by_dataset = {r.values["dataset"]: options(r) for r in runs}
  assert by_dataset == {"aptos2019": [], "isic2019": [],
                        "cbis_ddsm": ["--config.data.options.layout=lists", "--config.data.options.split=official"],
                        "chexpert": ["--config.data.options.views=frontal"]}
  config = load_config(runs[-1].config_spec, runs[-1].overrides)
  assert config.data.name == "chexpert" and dict(config.data.options) == {"views": "frontal"}


def test_study_sweeps_span_the_models_own_blocks_or_stages():
  axis = lambda spec, key: msweep.load_sweep(spec)["axes"][key]
  assert axis("configs/sweeps/progressive.py", "protocol.unfreeze_from") == list(range(13))
  assert axis("configs/sweeps/progressive.py:model=seem_focalt", "protocol.unfreeze_from") == [0, 1, 2, 3, 4]
  assert axis("configs/sweeps/decapitation.py:model=resnet152", "protocol.keep_blocks") == [1, 2, 3, 4]
  assert axis("configs/sweeps/decapitation.py:model=dinov2_vitl14", "protocol.keep_blocks") == list(range(1, 25))
  assert axis("configs/sweeps/decapitation.py:model=dinov2_vitl14,depth=3", "protocol.keep_blocks") == [1, 2, 3]


@pytest.mark.parametrize("spec,deit", [("paper.py", True), ("progressive.py:head=deit", True),
                                       ("progressive.py", False), ("decapitation.py", True),
                                       ("resolution.py", False), ("model_size.py", True)])
def test_every_study_sweep_names_the_checkpoints_it_needs(spec, deit):
  """With checkpoint_root, every run loads its foundation, and a DeiT-B head its DeiT-B weights
  (progressive takes the head from protocol.head; before, its DeiT-B head trained from random)."""
  runs = msweep.expand(msweep.load_sweep(f"configs/sweeps/{spec}{',' if ':' in spec else ':'}checkpoint_root=/ck"),
                       "/runs")
  for run in runs:
    assert any(o.startswith("--config.model.checkpoint=/ck/") for o in run.overrides), run.overrides
    protocol = str(run.values.get("protocol"))
    wants_deit = (protocol.endswith("_deit") or protocol == "decapitation"
                  or "--config.protocol.head=deit" in run.overrides)
    assert ("--config.head.checkpoint=/ck/deit_base_patch16" in run.overrides) == wants_deit, run.overrides
  assert any("--config.head.checkpoint=/ck/deit_base_patch16" in r.overrides for r in runs) == deit


def test_sweep_runs_skips_and_selects(setup):
  tmp, path = setup
  runs_dir = str(tmp / "runs")
  runs = msweep.expand(msweep.load_sweep(path), runs_dir)
  # Another machine's sweep trains the last run: this one leaves it, then trains it once that job is gone.
  other_job = subprocess.Popen(["sleep", "600"])
  os.makedirs(runs[3].workdir)
  other_lock = os.path.join(runs[3].workdir, lock.LOCK_FILE)
  with open(other_lock, "w") as f:
    json.dump({"token": "other", "host": socket.gethostname(), "machine": lock._machine(), "pid": other_job.pid,
               "process_start": lock._process_start(other_job.pid), "alive": time.time()}, f)
  cmd = [sys.executable, "-m", "mfjax.cli", "sweep", "--sweep", path, "--runs-dir", runs_dir, "--no-progress"]
  try:
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True)
  finally:
    other_job.kill()
    other_job.wait()
  assert out.returncode == 75, out.stderr[-3000:]  # a launcher does not start it again at once
  assert "sweep run 4/4 skipped" in out.stderr and f"process {other_job.pid}" in out.stderr
  assert "1 run(s) other jobs train are not finished" in out.stderr
  assert os.listdir(runs[3].workdir) == [lock.LOCK_FILE] and json.load(open(other_lock))["token"] == "other"
  assert all(os.path.exists(os.path.join(r.workdir, "result.json")) for r in runs[:3])
  before = {r.workdir: os.path.getmtime(os.path.join(r.workdir, "result.json")) for r in runs[:3]}
  out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and "3 finished, 1 to go" in out.stderr and "taking over" in out.stderr
  assert not os.path.exists(other_lock)
  results = {(r.values["lr"], r.values["seed"]): json.load(open(os.path.join(r.workdir, "result.json"))) for r in runs}
  mtimes = {r.workdir: os.path.getmtime(os.path.join(r.workdir, "result.json")) for r in runs}
  # Hand-computed selection: best mean validation headline over seeds.
  val = {lr: np.mean([results[(lr, s)]["val"]["headline"] for s in (0, 1)]) for lr in (1e-4, 3e-3)}
  best = max(val, key=val.get)
  tests = [results[(best, s)]["test"]["headline"] for s in (0, 1)]
  selection = json.load(open(os.path.join(runs[0].cell_dir, "selection.json")))
  assert selection["lr"] == best and selection["seeds"] == 2
  assert selection["test_mean"] == pytest.approx(np.mean(tests))
  assert selection["test_std"] == pytest.approx(np.std(tests, ddof=1))  # the report's sample std
  assert selection["seeds_by_lr"] == selection["expected_seeds_by_lr"] == {"0.0001": 2, "0.003": 2}
  # The finished runs were not retrained, and --list prints nothing.
  assert all(mtimes[w] == t for w, t in before.items())
  listed = subprocess.run(cmd + ["--list"], env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
                          capture_output=True, text=True)
  assert listed.returncode == 0 and listed.stdout.strip() == ""


def test_a_diverging_run_is_recorded_and_its_lr_not_selected(setup, tmp_path):
  tmp, _ = setup
  path = tmp_path / "diverging_sweep.py"
  path.write_text(SWEEP.replace('"lr": [1e-4, 3e-3], "seed": [0, 1]', '"lr": [1e-4, 1e30], "seed": [0]')
                  .replace('"epochs": 1,', '"epochs": 1, "optim.clip_norm": 0.0,') % (tmp / "data", tmp / "downloads"))
  runs_dir = str(tmp_path / "runs")
  selections = msweep.run_all(msweep.load_sweep(str(path)), runs_dir, progress=False)
  runs = msweep.expand(msweep.load_sweep(str(path)), runs_dir)
  diverged = json.load(open(os.path.join(runs[1].workdir, "result.json")))
  assert runs[1].values["lr"] == 1e30 and diverged["status"] == "diverged" and "loss" in diverged["error"]
  assert diverged["resized_at_load"] is False  # recorded as on a finished run, which the report groups by
  (selection,) = selections.values()
  assert selection["lr"] == 1e-4 and selection["diverged"] == [runs[1].workdir]
  from mfjax.report import results
  (cell,) = results.load_cells(runs_dir)  # the report reads the diverged run and selects as the sweep does
  assert cell.lr == 1e-4 and cell.lr_scores[1e30][1] == 1 and np.isnan(cell.lr_scores[1e30][0])
  from mfjax import report
  notes = report.build(runs_dir)["notes"]
  assert any("1 training run(s) diverged" in note and "lr=1e+30" in note for note in notes)
  # A finished run counts only with the sweep's config: a changed override is refused, not mixed in.
  with pytest.raises(ConfigError, match="different config.*data.augment"):
    msweep.run_all(msweep.load_sweep(str(path)), runs_dir, ["--config.data.augment=False"], progress=False)
  # ... and only on the build of the dataset it was trained on: a rebuilt dataset is refused, not mixed in.
  record = os.path.join(runs[0].workdir, "data_build.json")
  built = json.load(open(record))
  json.dump(dict(built, build="0" * 16), open(record, "w"))
  with pytest.raises(ConfigError, match="trained on another build of its dataset"):
    msweep.run_all(msweep.load_sweep(str(path)), runs_dir, progress=False)
  from mfjax.train import fit
  os.remove(os.path.join(runs[0].workdir, "result.json"))  # a resume of a run with checkpoints, too
  with pytest.raises(ConfigError, match="trained on another build of its dataset"):
    fit.train(load_config(runs[0].config_spec, runs[0].overrides), runs[0].workdir, progress=False)


def test_list_checks_every_command_before_printing(tmp_path, capsys):
  from mfjax import cli
  code = cli.main(["sweep", "--sweep", "configs/sweeps/paper.py:data_root=/d,checkpoint_root=/c",
                   "--runs-dir", str(tmp_path), "--list", "--config.data.uncertainty=zero"])
  printed = capsys.readouterr()
  assert code == 2 and "unknown data.uncertainty 'zero'" in printed.err and printed.out == ""
  code = cli.main(["sweep", "--sweep", "configs/sweeps/paper.py:data_root=/d,checkpoint_root=/c",
                   "--runs-dir", str(tmp_path), "--list"])
  assert code == 0 and capsys.readouterr().out.count("mfjax train") > 100
