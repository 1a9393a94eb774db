"""`mfjax sweep`: grid expansion, runs, skipping finished runs, learning-rate selection."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mfjax import data as mdata
from mfjax.data import synthetic
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


def test_sweep_runs_skips_and_selects(setup):
  tmp, path = setup
  runs_dir = str(tmp / "runs")
  cmd = [sys.executable, "-m", "mfjax.cli", "sweep", "--sweep", path, "--runs-dir", runs_dir, "--no-progress"]
  out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  runs = msweep.expand(msweep.load_sweep(path), runs_dir)
  results = {(r.values["lr"], r.values["seed"]): json.load(open(os.path.join(r.workdir, "result.json"))) for r in runs}
  mtimes = {r.workdir: os.path.getmtime(os.path.join(r.workdir, "result.json")) for r in runs}
  # Hand-computed selection: best mean validation headline over seeds.
  val = {lr: np.mean([results[(lr, s)]["val"]["headline"] for s in (0, 1)]) for lr in (1e-4, 3e-3)}
  best = max(val, key=val.get)
  tests = [results[(best, s)]["test"]["headline"] for s in (0, 1)]
  selection = json.load(open(os.path.join(runs[0].cell_dir, "selection.json")))
  assert selection["lr"] == best and selection["seeds"] == 2
  assert selection["test_mean"] == pytest.approx(np.mean(tests)) and selection["test_std"] == pytest.approx(np.std(tests))
  # Again: every run is finished, nothing is retrained, --list prints nothing.
  out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and "4 finished, 0 to go" in out.stderr
  assert all(os.path.getmtime(os.path.join(w, "result.json")) == t for w, t in mtimes.items())
  listed = subprocess.run(cmd + ["--list"], env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
                          capture_output=True, text=True)
  assert listed.returncode == 0 and listed.stdout.strip() == ""
