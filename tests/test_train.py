"""The training engine: protocols freeze what they should, sharding does not change the result,
runs resume exactly after SIGKILL and SIGTERM, two processes agree, and configs fail loudly."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfjax import data as mdata
from mfjax.cli import load_config
from mfjax.config import ConfigError
from mfjax.data import synthetic
from mfjax.train import build, fit
from tests.multiprocess import free_port, xla_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def aptos(module_tmp):
  tmp = module_tmp.mktemp("aptos")
  manual = synthetic.aptos2019(str(tmp / "download"), num_images=60, size=48)
  mdata.build("aptos2019", manual, str(tmp / "data"))  # built once, reused by every run
  return manual, str(tmp / "data")


def tiny(aptos, protocol="unfrozen_linear", *extra, model="deit_base_patch16", arg=""):
  manual, data_dir = aptos
  return load_config(f"configs/tiny.py:model={model},dataset=aptos2019,protocol={protocol}{arg}",
                     [f"--config.data.manual_dir={manual}", f"--config.data.data_dir={data_dir}", *extra])


def flat(tree):
  return {fit.parallel.path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def run_steps(config, n=3):
  run = fit.prepare(config)
  before = {k: flat(run.state[k]) for k in ("trainable", "frozen", "batch_stats")}
  loader = mdata.make_loader(run.dataset, "train", batch_size=config.batch_size, train=True, resolution=32)
  state, it = run.state, iter(loader)
  for _ in range(n):
    state, metrics = run.train_step(state, mdata.global_batch(next(it), fit.parallel.batch_sharding(run.mesh)),
                                    np.float32(1e-3))
  return run, before, state, float(metrics["loss"])


@pytest.mark.parametrize("protocol,extra,trained_foundation", [
    ("frozen_linear", [], set()),
    ("frozen_deit", [], set()),
    ("unfrozen_linear", [], {"patch_embed", "pos_embed", "cls_token", "blocks_0", "blocks_1", "norm"}),
    ("unfrozen_deit", [], {"patch_embed", "pos_embed", "cls_token", "blocks_0", "blocks_1", "norm"}),
    ("progressive", ["--config.protocol.unfreeze_from=1"], {"blocks_1"}),
    ("decapitation", ["--config.protocol.keep_blocks=1"], set()),
    ("decapitation", ["--config.protocol.keep_blocks=1", "--config.protocol.decapitation_trained=True"],
     {"patch_embed", "pos_embed", "cls_token", "blocks_0", "norm"}),
])
def test_protocols_freeze_exactly(aptos, protocol, extra, trained_foundation):
  run, before, state, loss = run_steps(tiny(aptos, protocol, *extra))
  assert np.isfinite(loss)
  trainable, frozen = flat(state["trainable"]), flat(state["frozen"])
  got = {k.split("/")[1] for k in trainable if k.startswith("foundation/")}
  assert got == trained_foundation
  head = "stacked" if protocol.endswith("deit") or protocol == "decapitation" else "fc"
  assert any(k.startswith(head + "/") for k in trainable)
  for k, v in frozen.items():  # frozen: bit-identical after training
    np.testing.assert_array_equal(v, before["frozen"][k], err_msg=k)
  # trained: every trainable leaf moved, the foundation's as well as the head's (a foundation cut
  # off from the gradient would leave its leaves trainable but unchanged)
  unchanged = [k for k, v in trainable.items() if np.array_equal(v, before["trainable"][k])]
  assert not unchanged, unchanged
  # No optimizer state for frozen parameters: Adam's moments mirror the trainable tree only.
  adam = state["opt"][1]
  assert set(flat(adam.mu)) == set(trainable) and set(flat(adam.nu)) == set(trainable)
  if protocol == "decapitation":
    blocks = {k.split("/")[1] for k in {**trainable, **frozen} if k.startswith("foundation/blocks_")}
    assert blocks == {"blocks_0"}


def _driver(args, env=None, timeout=300):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_driver.py"), *args],
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_mesh_shapes_give_the_same_losses(aptos):
  manual, data_dir = aptos
  common = ["--manual", manual, "--data", data_dir, "--steps", "4"]
  single = _driver(common + ["--mesh", "1,1"])[0]
  # A rule on the parameters' paths: Adam's moments ("opt/1/mu/...") follow their parameters.
  eight = _driver(common + ["--mesh", "8,1", "--mesh", "2,4", "--sharding-rules", "[('^params/', 'fsdp')]"],
                  env={"XLA_FLAGS": xla_devices(8)})
  assert single["devices"] == 1 and all(r["devices"] == 8 for r in eight)
  for r in eight:
    np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5, err_msg=str(r["mesh"]))
  fsdp = next(r for r in eight if r["mesh"] == [2, 4])
  # Large tensors really are split over the 'fsdp' axis, parameters and Adam moments alike.
  assert fsdp["sharded_params"] and all("fsdp" in spec for spec in fsdp["sharded_params"].values())
  assert fsdp["sharded_opt"] > 0 and fsdp["moments_follow_params"]
  shard = fsdp["bytes_per_device"]
  assert shard["max"] <= 1.3 * shard["total"] / 4 + shard["replicated"]


def test_two_processes_agree(aptos):
  manual, data_dir = aptos
  port = free_port()
  procs = []
  for pid in range(2):
    env = {**ENV, "MFJAX_COORDINATOR": f"127.0.0.1:{port}", "MFJAX_NUM_PROCESSES": "2",
           "MFJAX_PROCESS_ID": str(pid), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "train_driver.py"), "--manual",
                                   manual, "--data", data_dir, "--steps", "3", "--mesh", "2,1"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("{"))) for out, _ in outs]
  assert [r["process"] for r in results] == [0, 1] and all(r["devices"] == 2 for r in results)
  np.testing.assert_array_equal(results[0]["losses"], results[1]["losses"])
  single = _driver(["--manual", manual, "--data", data_dir, "--steps", "3", "--mesh", "2,1"],
                   env={"XLA_FLAGS": xla_devices(2)})[0]
  np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=1e-5)
  # Evaluation: every validation example once (9, the last batch padded), the same on both processes
  # and as on one process.
  assert results[0]["val"] == results[1]["val"] and results[0]["val"]["num_examples"] == 9
  for key, value in single["val"].items():
    assert results[0]["val"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _train_cmd(aptos, workdir, epochs=3):
  manual, data_dir = aptos
  return [sys.executable, "-m", "mfjax.cli", "train", "--no-progress", "--workdir", str(workdir),
          "--config", f"configs/tiny.py:model=deit_base_patch16,dataset=aptos2019,protocol=unfrozen_deit,epochs={epochs}",
          f"--config.data.manual_dir={manual}", f"--config.data.data_dir={data_dir}",
          "--config.checkpoint_every_steps=2", "--config.log_every_steps=3", "--config.model.drop_path=0.1"]


def _wait_for_step(workdir, step, proc, timeout=240):
  path, start = os.path.join(workdir, "metrics.jsonl"), time.time()
  while time.time() - start < timeout:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(l)["step"] for l in f if l.strip()]
      if steps and max(steps) >= step:
        return
    time.sleep(0.05)
  raise TimeoutError(f"no step {step} in {timeout}s")


def _final(workdir):
  import orbax.checkpoint as ocp
  ckpt = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  with ocp.StandardCheckpointer() as c:  # restored onto this process's device, whatever the run's mesh was
    path = os.path.join(ckpt, str(step), "state")
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = c.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), meta)
    state = c.restore(path, target)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.read()
  with open(os.path.join(workdir, "result.json")) as f:
    result = json.load(f)
  return flat(state), lines, result


def test_sigkill_and_sigterm_resume_exactly(aptos, tmp_path):
  subprocess.run(_train_cmd(aptos, tmp_path / "straight"), env=ENV, check=True, cwd=ROOT, capture_output=True)
  ref_state, ref_lines, ref_result = _final(tmp_path / "straight")

  # SIGKILL mid-epoch, then start again in the same workdir.
  proc = subprocess.Popen(_train_cmd(aptos, tmp_path / "killed"), env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  _wait_for_step(tmp_path / "killed", 5, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(_train_cmd(aptos, tmp_path / "killed"), env=ENV, check=True, cwd=ROOT, capture_output=True)
  state, lines, result = _final(tmp_path / "killed")
  assert lines == ref_lines
  assert result["test"] == ref_result["test"] and result["best_epoch"] == ref_result["best_epoch"]
  for k, v in ref_state.items():
    np.testing.assert_array_equal(state[k], v, err_msg=k)

  # SIGTERM (preemption) saves a checkpoint and exits 0: test_sigterm_to_one_of_two_processes_stops_both_at_one_step.
  # Ctrl-C is taken as SIGTERM: the steps so far are saved, and the next start finishes the run
  # identically. It exits 130, as a command ended by Ctrl-C does, so that `mfjax train A && mfjax
  # train B` stops there. A terminal's Ctrl-C reaches the whole process group, the grain data workers
  # included.
  proc = subprocess.Popen(_train_cmd(aptos, tmp_path / "int") + ["--config.data.num_workers=1"], env=ENV, cwd=ROOT,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  _wait_for_step(tmp_path / "int", 3, proc)
  os.killpg(proc.pid, signal.SIGINT)
  assert proc.wait(timeout=120) == 130
  err = proc.stderr.read()
  assert "Ctrl-C: saving a checkpoint after this step" in err and "SIGINT: saved the checkpoint at step" in err
  assert "Traceback" not in err
  subprocess.run(_train_cmd(aptos, tmp_path / "int") + ["--config.data.num_workers=1"], env=ENV, check=True,
                 cwd=ROOT, capture_output=True)
  state, lines, result = _final(tmp_path / "int")
  assert lines == ref_lines and result["test"] == ref_result["test"]
  for k, v in ref_state.items():
    np.testing.assert_array_equal(state[k], v, err_msg=k)


def _two_processes(cmd):
  port = free_port()
  return [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**ENV, "MFJAX_COORDINATOR": f"127.0.0.1:{port}", "MFJAX_NUM_PROCESSES": "2",
                                "MFJAX_PROCESS_ID": str(pid), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"})
          for pid in range(2)]


def _finish(procs, timeout=300):
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outs]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(aptos, tmp_path):
  """A preemption signal that reaches one process of a multi-host run: before, that process went
  into the checkpoint's barrier while the other went on to the next step, and both hung."""
  _finish(_two_processes(_train_cmd(aptos, tmp_path / "straight")))
  ref_state, ref_lines, ref_result = _final(tmp_path / "straight")
  procs = _two_processes(_train_cmd(aptos, tmp_path / "term"))
  _wait_for_step(tmp_path / "term", 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  errs = _finish(procs, timeout=120)
  saved = [re.findall(r"SIGTERM: saved the checkpoint at step (\d+)", err) for err in errs]
  assert saved[0] == saved[1] and len(saved[0]) == 1, errs[0][-2000:]
  assert not (tmp_path / "term" / "result.json").exists()
  _finish(_two_processes(_train_cmd(aptos, tmp_path / "term")))
  state, lines, result = _final(tmp_path / "term")
  assert lines == ref_lines and result["test"] == ref_result["test"]
  for k, v in ref_state.items():
    np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_data_workers_killed_by_a_preemption_are_started_again(aptos):
  import multiprocessing
  from mfjax import parallel
  run = fit.prepare(tiny(aptos, "frozen_linear"))
  make = lambda **kw: mdata.make_loader(run.dataset, "train", batch_size=8, train=True, resolution=32,
                                       num_epochs=None, **kw)
  loader = make(worker_count=1)
  expected = [b["image"] for b, _ in zip(make(), range(14))]
  iterator, preemption = iter(loader), parallel.Preemption()
  for i in range(2):
    np.testing.assert_array_equal(next(iterator)["image"], expected[i])
  for child in multiprocessing.active_children():  # what a SIGTERM to the process group does to them
    child.terminate()
  preemption.received = True
  got = []
  for _ in range(12):  # past the batches the parent had prefetched already
    iterator, batch = fit.next_surviving_workers(iterator, loader, preemption)
    got.append(batch["image"])
  for i, image in enumerate(got):
    np.testing.assert_array_equal(image, expected[2 + i])


def test_config_errors(aptos, tmp_path):
  with pytest.raises(ConfigError, match="unknown config field 'optim.lrr'.*valid:.*'lr'"):
    tiny(aptos, "unfrozen_linear", "--config.optim.lrr=0.1")
  with pytest.raises(ConfigError, match="unknown config argument 'protcol'"):
    load_config("configs/paper.py:protcol=frozen_linear", [])
  with pytest.raises(ConfigError, match="unknown model 'dinov5'.*dinov2_vitb14"):
    fit.prepare(tiny(aptos, "unfrozen_linear", "--config.model.name=dinov5"))
  with pytest.raises(ConfigError, match="unknown dataset 'aptos2020'.*aptos2019"):
    fit.prepare(tiny(aptos, "unfrozen_linear", "--config.data.name=aptos2020"))
  with pytest.raises(ConfigError, match="unknown protocol 'frozen'.*frozen_linear"):
    fit.prepare(tiny(aptos, "frozen"))
  # Named before the dataset is opened (a missing download would be reported first) or a workdir made.
  no_data = tiny(aptos, "unfrozen_linear", "--config.data.manual_dir=", "--config.model.name=dinov5")
  with pytest.raises(ConfigError, match="unknown model 'dinov5'"):
    fit.train(no_data, str(tmp_path / "typo"), progress=False)
  assert not (tmp_path / "typo").exists()
  with pytest.raises(ConfigError, match="expected a float"):
    tiny(aptos, "unfrozen_linear", "--config.optim.lr=fast")
  assert load_config("configs/segment.py", ["--config.eval.mirror=false"]).eval.mirror is False
  assert load_config("configs/segment.py:tiny=true", ["--config.eval.mirror=TRUE"]).eval.mirror is True
  with pytest.raises(ConfigError, match="eval.mirror='yes': expected True or False"):
    load_config("configs/segment.py", ["--config.eval.mirror=yes"])
  with pytest.raises(ConfigError, match="epochs='True': expected a int"):  # True is an int to Python
    tiny(aptos, "unfrozen_linear", "--config.epochs=True")
  # A run that saved nothing yet (its start failed) takes a corrected config; one with a checkpoint does not.
  fit.check_workdir(str(tmp_path), {"optim": {"lr": 0.3}})
  fit.check_workdir(str(tmp_path), {"optim": {"lr": 0.1}})
  assert json.loads((tmp_path / "config.json").read_text()) == {"optim": {"lr": 0.1}}
  (tmp_path / "backbones" / "step_2").mkdir(parents=True)  # a pretraining export is saved work too
  with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.1 -> 0.2\)"):
    fit.check_workdir(str(tmp_path), {"optim": {"lr": 0.2}})
  (tmp_path / "backbones" / "step_2").rmdir()
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.1 -> 0.2\)"):
    fit.check_workdir(str(tmp_path), {"optim": {"lr": 0.2}})
  # A field added to the config since the run started (a newer mfjax) resumes, and is recorded;
  # with any other difference it is still a different config.
  with pytest.raises(ConfigError, match=r"different config \(optim.b1: None -> 0.9; optim.lr: 0.1 -> 0.2\)"):
    fit.check_workdir(str(tmp_path), {"optim": {"lr": 0.2, "b1": 0.9}})
  fit.check_workdir(str(tmp_path), {"optim": {"lr": 0.1, "b1": 0.9}, "eval": {"new": True}})
  assert json.loads((tmp_path / "config.json").read_text()) == {"optim": {"lr": 0.1, "b1": 0.9}, "eval": {"new": True}}
  with pytest.raises(ConfigError, match=r"different config \(eval: \{'new': True\} -> None\)"):
    fit.check_workdir(str(tmp_path), {"optim": {"lr": 0.1, "b1": 0.9}})
  # A folder given relative at the start and absolute (or with a trailing slash) at a resume is the same
  # folder; another folder is not.
  run = tmp_path / "paths"
  (run / "checkpoints" / "4").mkdir(parents=True)
  relative = os.path.relpath(tmp_path / "data", os.getcwd())
  fit.check_workdir(str(run), {"data": {"manual_dir": relative}})
  fit.check_workdir(str(run), {"data": {"manual_dir": str(tmp_path / "data") + "/"}})
  assert json.loads((run / "config.json").read_text()) == {"data": {"manual_dir": str(tmp_path / "data") + "/"}}
  fit.check_workdir(str(run), {"data": {"manual_dir": relative}})
  with pytest.raises(ConfigError, match=r"different config \(data.manual_dir: "):
    fit.check_workdir(str(run), {"data": {"manual_dir": str(tmp_path / "other")}})
  # Fields a command declares changeable (segment's and pretrain's threads) may differ at a resume, and are
  # recorded; with any other difference it is still a different config.
  started = {"data": {"manual_dir": relative, "num_workers": 8}, "log_every_steps": 20}
  (run / "config.json").write_text(json.dumps(started))
  changeable = ("data.num_workers", "log_every_steps")
  with pytest.raises(ConfigError, match=r"different config \(data.num_workers: 8 -> 2\)"):
    fit.check_workdir(str(run), {**started, "data": {"manual_dir": relative, "num_workers": 2}})
  fit.check_workdir(str(run), {"data": {"manual_dir": relative, "num_workers": 2}, "log_every_steps": 5}, changeable)
  assert json.loads((run / "config.json").read_text())["data"]["num_workers"] == 2
  with pytest.raises(ConfigError, match=r"different config \(data.manual_dir: .*; data.num_workers: 2 -> 8\)"):
    fit.check_workdir(str(run), {"data": {"manual_dir": str(tmp_path / "other"), "num_workers": 8},
                                 "log_every_steps": 5}, changeable)


def test_data_norm_model_normalises_with_the_models_constants(aptos):
  from mfjax.evals import studies
  mesh = fit.parallel.make_mesh()
  pixels, keys = {}, {}
  for norm in ("dataset", "model"):
    config = tiny(aptos, "frozen_linear", f"--config.data.norm={norm}", model="openclip_vitb16")
    dataset = fit.open_dataset(config)
    pixels[norm] = np.asarray(next(studies.batches(config, dataset, "test", mesh))["image"])
    keys[norm] = studies.feature_key(config, dataset, "test", "classifier")
  mean, std = build.CLIP_NORM
  spec = dataset.spec
  np.testing.assert_allclose(pixels["model"] * np.array(std) + np.array(mean),
                             pixels["dataset"] * np.array(spec.std) + np.array(spec.mean), atol=1e-5)
  assert keys["model"]["transform"] != keys["dataset"]["transform"]  # cached features are kept apart
  # A random foundation is initialised differently by a classifier and by k-NN: not one cache entry.
  assert keys["model"]["checkpoint"] != studies.feature_key(config, dataset, "test", "model")["checkpoint"]
  with pytest.raises(ConfigError, match="unknown data.norm 'imagenet'; valid: dataset, model"):
    build.input_norm(tiny(aptos, "frozen_linear", "--config.data.norm=imagenet"))


def test_knn_and_cka_studies_end_to_end(aptos, tmp_path, caplog):
  import dataclasses
  import logging
  from mfjax.evals import cka, knn, studies
  config = tiny(aptos, "frozen_linear", "--config.batch_size=10")
  dataset = fit.open_dataset(config)
  cache_dir = tmp_path / "cache"
  out = studies.knn(config, str(tmp_path / "knn"), ks=(3, 5), cache_dir=str(cache_dir), temperature=0.07)
  written = json.loads((tmp_path / "knn" / "knn.json").read_text())
  assert written["temperature"] == 0.07
  # The dataset's build options, which the report compares with the paper's task (its ‡).
  assert written["data"] == {"options": config.data.options.to_dict(), "uncertainty": "zeros"}
  # The bank is the training split, the queries the test split, every example once.
  cached = {json.loads(p.read_text())["split"]: np.load(p.with_suffix(".npz")) for p in cache_dir.glob("*.json")}
  assert {s: len(a["features"]) for s, a in cached.items()} == {s: dataset.split_sizes[s] for s in ("train", "test")}
  expected = knn.knn_evaluate(cached["train"]["features"], cached["train"]["labels"], cached["test"]["features"],
                              cached["test"]["labels"], ks=(3, 5), num_classes=5, multi_label=False,
                              headline="quadratic_kappa", temperature=0.07)
  assert {k: v["headline"] for k, v in out["k"].items()} == {k: v["headline"] for k, v in expected.items()}
  # A dataset rebuilt in place from changed sources must not be served the old features and labels.
  key = studies.feature_key(config, dataset, "test", "model")
  rebuilt = dataclasses.replace(dataset, metadata={**dataset.metadata, "sources": {"train.csv": "another"}})
  assert key["dataset"] == studies.feature_key(config, rebuilt, "test", "model")["dataset"]
  assert key != studies.feature_key(config, rebuilt, "test", "model")
  # ... nor one rebuilt from the same CSVs (new images, an mfjax fix to decoding): each build has its id.
  assert dataset.metadata["build_id"]
  rebuilt = dataclasses.replace(dataset, metadata={**dataset.metadata, "build_id": "another"})
  assert key != studies.feature_key(config, rebuilt, "test", "model")

  # CKA of foundations fed at their own normalisation; a last batch of 4 (of 19) is left out, not weighed
  # like a full one.
  batch = 19
  assert 4 <= dataset.split_sizes["train"] % batch < batch / 2
  configs = [tiny(aptos, "frozen_linear", f"--config.batch_size={batch}"),
             tiny(aptos, "frozen_linear", f"--config.batch_size={batch}", "--config.data.norm=model",
                  model="openclip_vitb16")]
  with caplog.at_level(logging.INFO, logger="mfjax"):
    path = studies.cka_foundations(configs, str(tmp_path / "cka"), split="train")
  result = json.loads(open(path).read())
  used = dataset.split_sizes["train"] // batch * batch
  assert result["num_examples"] == used and f"left out the last {dataset.split_sizes['train'] - used}" in caplog.text
  assert result["matrix"][0][0] == pytest.approx(1.0) and result["matrix"][0][1] == result["matrix"][1][0]
  # The same matrix from the models' features of the same full batches, computed here.
  images = {norm: np.concatenate([np.asarray(b["image"]) for b, _ in zip(
      studies.batches(c, dataset, "train", fit.parallel.make_mesh()), range(used // batch))])
      for norm, c in (("dataset", configs[0]), ("model", configs[1]))}
  feats = []
  for c, norm in zip(configs, ("dataset", "model")):
    module, variables = studies.foundation(c)
    blocks = module.apply(variables, images[norm], train=False, return_blocks=True)["blocks"]
    feats.append(studies.pool_tokens(blocks[-1]))
  expected = cka.MinibatchCKA()
  for start in range(0, used, batch):
    expected.update([np.asarray(f)[start:start + batch] for f in feats])
  np.testing.assert_allclose(result["matrix"], expected.result(), rtol=1e-5)

  # A cached-feature linear probe has no foundation blocks to compare: said plainly.
  probe = tiny(aptos, "frozen_linear", "--config.data.augment=False", arg=",epochs=1")
  assert fit.uses_feature_cache(probe)
  fit.train(probe, str(tmp_path / "run"), progress=False)
  with pytest.raises(ConfigError, match="cached features"):
    studies.cka_run(str(tmp_path / "run"))

  # `mfjax cka --workdir` (Figs. 7 and A.1): each block before vs after fine-tuning, the stacked head's too.
  tuned = tiny(aptos, "unfrozen_deit", "--config.optim.lr=0.01", arg=",epochs=1")
  fit.train(tuned, str(tmp_path / "tuned"), progress=False)
  paths = studies.cka_run(str(tmp_path / "tuned"))
  assert sorted(os.path.basename(p) for p in paths) == ["cka_layers.json", "cka_stacked.json"]
  for path in paths:
    matrix = np.asarray(json.loads(open(path).read())["matrix"])
    assert matrix.shape[0] == matrix.shape[1] >= 2 and np.all(matrix >= -1e-6) and np.all(matrix <= 1 + 1e-5)
    # the fine-tuned blocks moved: "after" is not "before" again (their CKA would be 1 exactly)
    assert np.diag(matrix).min() < 1 - 1e-6, path


def test_paper_config_details(caplog):
  # SEEM's D2FocalNet trains with drop-path 0.3 in the paper's code; the other foundations with none.
  assert load_config("configs/paper.py:model=seem_focalt", []).model.drop_path == 0.3
  assert load_config("configs/paper.py:model=seem_focalt,protocol=frozen_deit", []).model.drop_path == 0.0
  assert load_config("configs/paper.py:model=dinov2_vitb14", []).model.drop_path == 0.0
  # The warmup follows the dataset= argument; overriding data.name alone leaves APTOS's, and says so.
  fit.check_paper_defaults(load_config("configs/paper.py:dataset=isic2019", []))
  fit.check_paper_defaults(load_config("configs/paper.py:model=seem_focalt,protocol=unfrozen_deit", []))
  assert not caplog.records
  fit.check_paper_defaults(load_config("configs/paper.py:dataset=aptos2019", ["--config.data.name=isic2019"]))
  assert "is the paper's for aptos2019/cbis_ddsm, not for isic2019" in caplog.text
  with pytest.raises(ConfigError, match="optim.warmup_epochs=5 and optim.warmup_steps=1000: set one"):
    fit.check_paper_defaults(load_config("configs/paper.py:dataset=isic2019", ["--config.optim.warmup_epochs=5"]))
  # So does SEEM's drop-path, which follows model= and protocol=.
  for arg, overrides in (("model=seem_focalt", ["--config.protocol.name=frozen_linear"]),
                         ("protocol=unfrozen_deit", ["--config.model.name=seem_focalt"])):
    caplog.clear()
    fit.check_paper_defaults(load_config(f"configs/paper.py:{arg}", overrides))
    assert "model.drop_path=0.3, the paper's is 0.0 for seem_focalt under frozen_linear" in caplog.text or \
        "model.drop_path=0.0, the paper's is 0.3 for seem_focalt under unfrozen_deit" in caplog.text
  # A protocol field that the protocol does not read, a stacked head under a linear protocol, or more
  # blocks than the model has are refused, not ignored.
  for arg, overrides, message in (
      ("protocol=unfrozen_linear", ["--config.protocol.head=deit"], "protocol.head='deit' does not apply to"),
      ("protocol=progressive", ["--config.protocol.head=Deit"], "unknown protocol.head 'Deit'"),
      ("protocol=frozen_linear", ["--config.protocol.unfreeze_from=3"], "unfreeze_from=3 applies to protocol "
                                                                       "progressive only, not to frozen_linear"),
      ("protocol=unfrozen_deit", ["--config.protocol.keep_blocks=4"], "keep_blocks=4 applies to protocol decap"),
      ("protocol=frozen_deit", ["--config.protocol.decapitation_trained=True"], "decapitation_trained=True"),
  ):
    with pytest.raises(ConfigError, match=message):
      build.check_names(load_config(f"configs/paper.py:{arg}", overrides))
  build.check_names(load_config("configs/paper.py:protocol=progressive", ["--config.protocol.head=deit"]))
  with pytest.raises(ConfigError, match="protocol.keep_blocks=13 but dinov2_vitb14 has 12 blocks"):
    build.foundation_spec(load_config("configs/paper.py:protocol=decapitation", ["--config.protocol.keep_blocks=13"]))
  # A colon argument that is not the int it should be is an error, not truncated.
  for bad in ("epochs=2.7", "seed=True", "batch='64'"):
    with pytest.raises(ConfigError, match="expected an int"):
      load_config(f"configs/paper.py:{bad}", [])
  assert load_config("configs/paper.py:epochs=1e2", []).epochs == 100


def test_bad_data_is_a_one_line_error_from_the_cli(tmp_path, capsys):
  from mfjax import cli
  missing = tmp_path / "not_downloaded"
  assert cli.main(["train", "--config", "configs/tiny.py:model=deit_base_patch16,dataset=aptos2019",
                   f"--config.data.manual_dir={missing}", f"--config.data.data_dir={tmp_path / 'data'}",
                   "--workdir", str(tmp_path / "run"), "--no-progress"]) == 2
  assert f"error: aptos2019: manual_dir '{missing}' is not a folder" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_:
    cli.main(["knn", "--config", "configs/tiny.py", "--out", str(tmp_path / "knn"), "--ks", "5,a"])
  assert exit_.value.code == 2 and "--ks '5,a': comma-separated whole numbers" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a space for the '=': the key is named, not the value
    cli.main(["knn", "--config", "configs/tiny.py", "--out", str(tmp_path / "knn"), "--config.data.manual_dir", "/x"])
  assert "--config.data.manual_dir takes its value after '=': --config.data.manual_dir=/x" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # with --workdir the run's saved config decides: an override is refused
    cli.main(["cka", "--workdir", str(tmp_path), "--config.data.norm=model"])
  assert "unrecognized arguments: ['--config.data.norm=model']" in capsys.readouterr().err
  assert cli.main(["report", str(tmp_path)]) == 2  # a ReportError: one line, no traceback
  assert "error: no result.json, knn.json or cka_*.json below" in capsys.readouterr().err


def test_a_finished_older_run_is_left_as_it_is_and_read_as_it_ran(aptos, tmp_path):
  """An mfjax without model.freeze_unused wrote this config.json: started again, the finished run
  returns its result without writing (a reader may not); read for eval or a study, it is rebuilt
  as it ran (the SAM neck trained, where a fresh run freezes it)."""
  config = tiny(aptos, "frozen_linear", arg=",epochs=1")
  result = fit.train(config, str(tmp_path / "run"), progress=False)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  del saved["model"]["freeze_unused"]
  older = json.dumps(saved)
  (tmp_path / "run" / "config.json").write_text(older)
  assert fit.train(config, str(tmp_path / "run"), progress=False)["test"] == result["test"]
  assert (tmp_path / "run" / "config.json").read_text() == older
  sam = fit.to_dict(tiny(aptos, "unfrozen_linear", model="sam_vitb"))
  del sam["model"]["freeze_unused"]
  os.makedirs(tmp_path / "sam")
  (tmp_path / "sam" / "config.json").write_text(json.dumps(sam))
  assert fit.read_run_config(str(tmp_path / "sam"))[1].model.freeze_unused is False
  assert "freeze_unused" not in fit.read_run_config(str(tmp_path / "run"))[1].model  # frozen: nothing to keep


def test_a_run_killed_while_saving_its_last_epoch_finishes_on_restart(aptos, tmp_path, monkeypatch):
  # The end of an epoch saves `best`, then `latest`. Killed during the second, the restart redoes the
  # epoch and saves its own best anew (a killed attempt's best is not taken for this run's).
  config = tiny(aptos, "frozen_linear", arg=",epochs=1")
  first = fit.train(config, str(tmp_path), progress=False)
  (tmp_path / "result.json").unlink()
  shutil.rmtree(tmp_path / "checkpoints")
  [best_dir] = (tmp_path / "best").iterdir()
  (best_dir / "left_by_the_killed_attempt").write_text("")
  again = fit.train(config, str(tmp_path), progress=False)
  assert again["test"] == first["test"] and again["best_epoch"] == first["best_epoch"] == 1
  assert not (best_dir / "left_by_the_killed_attempt").exists()
  # Restarted after its last step, it tests at once: the prediction step is compiled on the validation
  # split first, out of the test's timing.
  (tmp_path / "result.json").unlink()
  evaluated = []
  prepare = fit.prepare

  def recording_prepare(*args, **kwargs):
    run = prepare(*args, **kwargs)
    evaluate = run.evaluate
    return dataclasses.replace(run, evaluate=lambda split, params: evaluated.append(split) or evaluate(split, params))

  monkeypatch.setattr(fit, "prepare", recording_prepare)
  assert fit.train(config, str(tmp_path), progress=False)["test"] == first["test"]
  assert evaluated == ["validation", "test"]
  # Started once more, the finished run returns its result and appends nothing.
  lines = (tmp_path / "metrics.jsonl").read_text()
  assert fit.train(config, str(tmp_path), progress=False) == json.loads((tmp_path / "result.json").read_text())
  assert (tmp_path / "metrics.jsonl").read_text() == lines and sum('"test/' in l for l in lines.splitlines()) == 1


def test_nonfinite_loss_stops_with_the_step(aptos, tmp_path):
  config = tiny(aptos, "unfrozen_linear", "--config.optim.lr=1e30", "--config.optim.clip_norm=0.0",
                "--config.checkpoint_every_steps=1000")
  with pytest.raises(fit.NonFiniteError, match=r"step \d+: loss"):
    fit.train(config, str(tmp_path / "nan"), progress=False)


@pytest.mark.parametrize("model,protocol,extra,trained", [
    ("seem_focalt", "progressive", ["--config.protocol.unfreeze_from=2"],
     {"layers_2_blocks_0", "layers_2_downsample", "layers_3_blocks_0"}),  # norm2/3 sit outside SEEM's `layers`
    ("resnet152", "progressive", ["--config.protocol.unfreeze_from=3"], {"layer4_0"}),
    ("resnet152", "decapitation", ["--config.protocol.keep_blocks=2"], set()),
    ("resnet152", "unfrozen_linear", [], None),
])
def test_stage_protocols_on_conv_families(aptos, model, protocol, extra, trained):
  run, before, state, loss = run_steps(tiny(aptos, protocol, *extra, model=model))
  assert np.isfinite(loss)
  trainable = flat(state["trainable"])
  unchanged = [k for k, v in trainable.items() if np.array_equal(v, before["trainable"][k])]
  assert not unchanged, unchanged  # what trains, moved
  if trained is None:  # the whole foundation trains, in training mode: BatchNorm statistics move
    assert not flat(state["frozen"])
    assert any(k.startswith("foundation/layer1") for k in trainable)
    stats = flat(state["batch_stats"])
    assert any(not np.array_equal(v, before["batch_stats"][k]) for k, v in stats.items())
    return
  assert {k.split("/")[1] for k in trainable if k.startswith("foundation/")} == trained
  if model.startswith("resnet"):
    # Progressive freezing and a frozen decapitated foundation run in inference mode: no
    # BatchNorm statistic moves.
    stats = flat(state["batch_stats"])
    assert stats and all(np.array_equal(v, before["batch_stats"][k]) for k, v in stats.items())
  if protocol == "decapitation":
    assert not any(k.startswith(("foundation/layer3", "foundation/layer4")) for k in flat(state["frozen"]))


def test_frozen_linear_on_cached_features_matches_the_full_model(aptos, tmp_path):
  """Without augmentation, frozen linear probing on cached features is the same computation as
  running the frozen foundation every step: same losses, same test metrics."""
  common = ["--config.data.augment=False", f"--config.data.feature_cache={tmp_path / 'cache'}",
            "--config.checkpoint_every_steps=1000"]
  cached_config = tiny(aptos, "frozen_linear", *common, arg=",epochs=2")
  full_config = tiny(aptos, "frozen_linear", *common, "--config.data.cache_features=False", arg=",epochs=2")
  assert fit.uses_feature_cache(cached_config) and not fit.uses_feature_cache(full_config)
  cached = fit.train(cached_config, str(tmp_path / "cached"), progress=False)
  assert os.listdir(tmp_path / "cache")  # features computed once and stored
  full = fit.train(full_config, str(tmp_path / "full"), progress=False)
  losses = {name: [json.loads(l)["train/loss"] for l in open(tmp_path / name / "metrics.jsonl") if "train/loss" in l]
            for name in ("cached", "full")}
  assert len(losses["cached"]) > 3
  np.testing.assert_allclose(losses["cached"], losses["full"], rtol=1e-4)
  assert cached["test"]["headline"] == pytest.approx(full["test"]["headline"], abs=1e-6)
  # The probe stands for the whole classifier: its parameter count; its test times a linear layer: no throughput.
  assert cached["params_total"] == full["params_total"] and cached["params_trained"] == full["params_trained"]
  assert cached["test_images_per_second"] is None and cached["cached_features"] is True
  assert full["test_images_per_second"] > 0 and full["cached_features"] is False
  # `mfjax eval` rebuilds the run from its folder and scores its best checkpoint as the run did.
  from mfjax import cli
  assert cli.main(["eval", "--workdir", str(tmp_path / "full")]) == 0
  scored = json.loads((tmp_path / "full" / "eval_test.json").read_text())
  assert scored["metrics"]["headline"] == pytest.approx(full["test"]["headline"], abs=1e-6)


@pytest.mark.parametrize("model", ["sam_vitb", "dinov3_vitb16"])
def test_every_family_trains_under_the_stacked_head(aptos, model):
  run, before, state, loss = run_steps(tiny(aptos, "unfrozen_deit", model=model), n=2)
  assert np.isfinite(loss)
  trainable = flat(state["trainable"])
  assert any(k.startswith("foundation/") for k in trainable) and any(k.startswith("stacked/") for k in trainable)


def test_fresh_heads_start_as_torch_linears():
  """The paper's fc and projector are new nn.Linear layers: weight and bias uniform in ±1/sqrt(fan_in)."""
  import torch
  from mfjax.models import heads
  features = jax.numpy.zeros((2, 768))
  params = heads.LinearProbe(1000).init(jax.random.PRNGKey(0), features)["params"]["fc"]
  reference = torch.nn.Linear(768, 1000)
  bound = 768 ** -0.5
  for name, ours, theirs in (("kernel", params["kernel"], reference.weight), ("bias", params["bias"], reference.bias)):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
    assert abs(ours.std() - theirs.std()) < 0.05 * theirs.std(), name  # both bound / sqrt(3)


@pytest.mark.parametrize("model", ["sam_vitb", "openclip_vitb16"])
def test_position_tables_resized_at_load_as_the_papers_code(aptos, tmp_path, model):
  """SAM (filter_interpolate_weights) and OpenCLIP (force_image_size) resize their position tables
  once at load in the paper's code, and train the resized tables: the same forward at the run's
  resolution, smaller tables in the train state. A run started before the option resumes as it ran."""
  from configs.tiny import TINY_FOUNDATION
  from mfjax import models
  family = "sam" if model.startswith("sam") else "vit"
  native = models.create(model, **TINY_FOUNDATION[family])
  variables = models.init_params(native, jax.random.PRNGKey(1))
  variables = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), variables)
  models.save(str(tmp_path / "ckpt"), model, variables, dict(TINY_FOUNDATION[family]))
  config = tiny(aptos, "unfrozen_linear", f"--config.model.checkpoint={tmp_path / 'ckpt'}", model=model, arg=",res=48")
  loaded = fit.build.pretrained_foundation(config)
  name, overrides = fit.build.foundation_spec(config)
  assert overrides["native_resolution"] == (48, 48)
  x = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
  at_load = models.create(name, **overrides).apply(loaded, x, return_blocks=True)
  per_call = native.apply(variables, x, return_blocks=True)
  for key in ("pooled", "tokens"):
    np.testing.assert_allclose(at_load[key], per_call[key], rtol=1e-5, atol=1e-5)
  # model.overrides choose the resampling at load too, as they do at every forward.
  field, value = ("rel_pos_resize", "linear") if family == "sam" else ("posemb", "size")
  other = tiny(aptos, "unfrozen_linear", f"--config.model.checkpoint={tmp_path / 'ckpt'}",
               f"--config.model.overrides.{field}={value}", model=model, arg=",res=48")
  changed = models.create(model, **{**TINY_FOUNDATION[family], field: value})
  per_call = changed.apply(variables, x)
  other_name, other_overrides = fit.build.foundation_spec(other)
  at_load = models.create(other_name, **other_overrides).apply(fit.build.pretrained_foundation(other), x)
  np.testing.assert_allclose(at_load["tokens"], per_call["tokens"], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(per_call["tokens"]) - np.asarray(native.apply(variables, x)["tokens"])).max() > 1e-3
  grid = 48 // 8
  pos = flat(fit.prepare(config).state["trainable"])["foundation/pos_embed"]
  assert pos.shape == ((1, grid, grid, 32) if family == "sam" else (1, 1 + grid * grid, 32))
  if family == "sam":  # the global block's relative-position tables too
    assert flat(loaded["params"])["blocks_1/attn/rel_pos_h"].shape[0] == 2 * grid - 1
  # A run whose config.json predates model.resize_at_load resumes with its tables at native size.
  old = fit.to_dict(config)
  del old["model"]["resize_at_load"]
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "config.json").write_text(json.dumps(old))
  resumed = tiny(aptos, "unfrozen_linear", f"--config.model.checkpoint={tmp_path / 'ckpt'}", model=model, arg=",res=48")
  fit.start_run(resumed, str(tmp_path / "old"))
  assert resumed.model.resize_at_load is False
  # A sweep's check of a finished run records the field as the run ran, too.
  (tmp_path / "old" / "config.json").write_text(json.dumps(old))
  fit.check_workdir(str(tmp_path / "old"), fit.to_dict(config))
  assert json.loads((tmp_path / "old" / "config.json").read_text())["model"]["resize_at_load"] is False
  # At the checkpoint's own resolution nothing is resized: the field is left as it is.
  native = tiny(aptos, "unfrozen_linear", f"--config.model.checkpoint={tmp_path / 'ckpt'}", model=model)
  (tmp_path / "old" / "config.json").write_text(json.dumps(old))
  fit.start_run(native, str(tmp_path / "old"))
  assert native.model.resize_at_load is True and not fit.build.resized_at_load(native)
  assert fit.build.foundation_spec(resumed)[1]["native_resolution"] == (32, 32)  # the checkpoint's


def test_unused_and_torch_one_dim_parameters(aptos, tmp_path):
  from mfjax.train import optim, protocols
  # SAM's neck, which the classifier never uses (the paper's code drops it): frozen, without optimizer
  # state, and not counted.
  sam = tiny(aptos, "unfrozen_linear", model="sam_vitb")
  run = fit.prepare(sam)
  trainable, frozen = flat(run.state["trainable"]), flat(run.state["frozen"])
  neck = {k: v.size for k, v in frozen.items() if k.startswith("foundation/neck/")}
  assert neck and not any(k.startswith("foundation/neck/") for k in trainable)
  assert set(flat(run.state["opt"][1].mu)) == set(trainable)
  assert run.n_trainable == sum(v.size for v in trainable.values())
  assert run.n_total == run.n_trainable + sum(v.size for v in frozen.values()) - sum(neck.values())
  # A run started before (its checkpoints hold the neck in the trained state) resumes as it ran.
  old = fit.to_dict(sam)
  del old["model"]["freeze_unused"]
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "config.json").write_text(json.dumps(old))
  resumed = tiny(aptos, "unfrozen_linear", model="sam_vitb")
  fit.start_run(resumed, str(tmp_path / "old"))
  assert resumed.model.freeze_unused is False
  assert any(k.startswith("foundation/neck/") for k in flat(fit.prepare(resumed).state["trainable"]))
  # OpenCLIP's class embedding is 1-D in open_clip: no weight decay, as the paper's rule gives it.
  config = tiny(aptos, "unfrozen_linear", model="openclip_vitb16")
  params = build.abstract_params(build.build_classifier(config, 5), (32, 32, 3))["params"]
  decays = flat(optim.decay_mask(params, build.one_dim_in_torch(config)))
  assert not decays["foundation/cls_token"] and decays["foundation/pos_embed"] and decays["fc/kernel"]
  assert flat(optim.decay_mask(params))["foundation/cls_token"]
  assert build.one_dim_in_torch(tiny(aptos, model="deit_base_patch16")) == ()
  assert protocols.count_used({"foundation": {"neck": {"w": np.zeros(3)}, "b": np.zeros(2)}}) == 2


def test_a_kill_between_a_new_best_and_its_latest_checkpoint_keeps_the_recorded_best(tmp_path):
  from mfjax.train.checkpoints import RunCheckpoints
  params = lambda v: {"w": jnp.full((3,), v, jnp.float32)}
  ckpts = RunCheckpoints(tmp_path / "run")
  ckpts.save_best(10, params(1.0), {"epoch": 1})
  ckpts.save_latest(10, params(1.0), {"best_step": 10})
  ckpts.keep_best_only(10)
  ckpts.save_best(20, params(2.0), {"epoch": 2})  # ... and killed before `latest` records step 20
  ckpts.close()
  resumed = RunCheckpoints(tmp_path / "run")
  _, host = resumed.restore_latest(jax.eval_shape(lambda: params(0.0)))
  resumed.drop_best_after(10)  # the run redoes epoch 2; the best it records is still there
  assert resumed.best.all_steps() == [host["best_step"]] == [10]
  best, best_host = resumed.restore_best(jax.eval_shape(lambda: params(0.0)), host["best_step"])
  assert float(best["w"][0]) == 1.0 and best_host == {"epoch": 1}
  resumed.save_best(20, params(2.0), {"epoch": 2})
  resumed.save_latest(20, params(2.0), {"best_step": 20})
  resumed.keep_best_only(20)
  assert resumed.best.all_steps() == [20] and resumed.restore_best(jax.eval_shape(lambda: params(0.0)), 10) is None
  resumed.close()


def test_what_a_killed_save_left_is_deleted_by_the_runs_own_job_only(tmp_path):
  from mfjax.train.checkpoints import RunCheckpoints
  params = lambda v: {"w": jnp.full((3,), v, jnp.float32)}
  ckpts = RunCheckpoints(tmp_path / "run", owner=True)
  ckpts.save_latest(10, params(1.0), {"step": 10})
  ckpts.save_best(10, params(1.0), {"epoch": 1})
  ckpts.close()
  for folder in ("checkpoints", "best"):  # a save of step 30 killed midway (a full copy of step 10's)
    shutil.copytree(tmp_path / "run" / folder / "10", tmp_path / "run" / folder / "30.orbax-checkpoint-tmp")
  left = lambda: sorted(p.name for f in ("checkpoints", "best") for p in (tmp_path / "run" / f).iterdir())
  reader = RunCheckpoints(tmp_path / "run")  # `mfjax eval` of a running run: may be a save in progress
  assert reader.restore_best(jax.eval_shape(lambda: params(0.0)))[1] == {"epoch": 1}
  reader.close()
  assert left() == ["10", "10", "30.orbax-checkpoint-tmp", "30.orbax-checkpoint-tmp"]
  resumed = RunCheckpoints(tmp_path / "run", owner=True)  # resumes at step 10, saves 20 (at another cadence)
  _, host = resumed.restore_latest(jax.eval_shape(lambda: params(0.0)))
  resumed.save_best(20, params(2.0), {"epoch": 2})
  resumed.save_latest(20, params(2.0), {"step": 20})
  resumed.close()
  assert host == {"step": 10} and left() == ["10", "20", "20"]


def test_a_damaged_metrics_log_and_an_early_test_record_do_not_block_a_resume(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 10, "train/loss": 1.0}\n{"step": 20, "test/auc": 0.9}\n{"step": 20, "val/auc": 0.8}\n'
                  '{"step": 30, "train/loss": 0.5}\n{"step": 40, "trai' + "\0" * 8)
  assert fit.kept_lines(path, 20) == ['{"step": 10, "train/loss": 1.0}\n', '{"step": 20, "val/auc": 0.8}\n']
  assert "metrics.jsonl, line 5: damaged" in caplog.text
  fit.write_atomically(tmp_path / "result.json", '{"a": 1}')
  assert json.loads((tmp_path / "result.json").read_text()) == {"a": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "result.json"]


def _tensorboard_events(path):
  """(step, tag, value or None) of each event in a TFRecord file of TensorBoard Event protos."""
  from tensorboardX.proto.event_pb2 import Event
  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    size = int.from_bytes(data[at:at + 8], "little")
    event = Event.FromString(data[at + 12:at + 12 + size])
    at += 12 + size + 4  # length, its CRC, the record, its CRC
    events += [(event.step, v.tag, v.simple_value) for v in event.summary.value] or [(event.step, None, None)]
  return events


def test_tensorboard_events_follow_the_log_without_importing_torch(tmp_path):
  """Scalars reach TensorBoard; a resume marks the steps after its checkpoint as purged; and the
  trainer's process does not import torch for it (tensorboardX would: 1.5-2 s and ~600 MB per run)."""
  code = ("import sys, time\n"
          "from etils import epath\n"
          "from mfjax.train import fit\n"
          f"folder = epath.Path({str(tmp_path)!r})\n"
          "w = fit.Writer(folder, 0)\n"
          "w.write(1, {'train/loss': 0.5, 'note': 'text'}); w.write(2, {'train/loss': 0.25, 'val/auc': float('nan')})\n"
          "w.close(); time.sleep(1.1)\n"  # the events file is named by the second
          "w = fit.Writer(folder, 1)\n"
          "w.write(2, {'train/loss': 0.125}); w.close()\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  first, resumed = sorted(tmp_path.glob("events.out.tfevents.*"))
  assert [e for e in _tensorboard_events(first) if e[1]] == [(1, "train/loss", 0.5), (2, "train/loss", 0.25)]
  assert [e for e in _tensorboard_events(resumed) if e[1]] == [(2, "train/loss", 0.125)]
  assert (2, None, None) in _tensorboard_events(resumed)  # the purge marker at step 2: TensorBoard hides the first 2
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_cheap_typos_are_config_errors_before_any_work(aptos, tmp_path, caplog):
  for extra, message in (
      (["--config.model.dtype=bf16"], "unknown model.dtype 'bf16'"),
      (["--config.data.uncertainty=zero"], "unknown data.uncertainty 'zero'"),
      (["--config.model.overrides.posemb=deit_sqr"], "unknown model.overrides.posemb 'deit_sqr'"),
      (["--config.model.overrides.attn_impl=cudnnn"], "unknown model.overrides.attn_impl 'cudnnn'"),
      (["--config.epochs=0"], r"epochs=0 must be an int >= 1"),
      (["--config.optim.lr=-0.001"], r"optim.lr=-0.001 is outside \(0, inf\)"),
      (["--config.optim.b1=2.0"], r"optim.b1=2.0 is outside \[0, 1\)"),
      (["--config.optim.weight_decay=-1.0"], r"optim.weight_decay=-1.0 is outside \[0, inf\)"),
      (["--config.optim.plateau_factor=5.0"], r"optim.plateau_factor=5.0 is outside \(0, 1\]"),
      (["--config.data.resolution=30"], r"data.resolution=30 is not a multiple of deit_base_patch16's patch size 8"),
      (["--config.data.resolution=0"], r"data.resolution=0 must be an int >= 1"),
      (["--config.model.overrides.remat_policy=dot"], "unknown model.overrides.remat_policy 'dot'"),
      (["--config.model.matmul_precision=hihgest"], "unknown model.matmul_precision 'hihgest'"),
      (["--config.log_every_steps=0"], r"log_every_steps=0 must be an int >= 1"),
      (["--config.checkpoint_every_steps=-5"], r"checkpoint_every_steps=-5 must be an int >= 1"),
      (["--config.seed=-1"], r"seed=-1 must be an int >= 0"),
      (["--config.optim.mu_dtype=bf16"], "unknown optim.mu_dtype 'bf16'"),
      (["--config.optim.plateau_patience=-3"], r"optim.plateau_patience=-3 must be an int >= 0, or -1"),
      (["--config.sharding_rules=[('.*', 'fsdb')]"], r"sharding_rules\[0\]=\('.\*', 'fsdb'\) must be a \(regex"),
      (["--config.sharding_rules=[('(', 'fsdp')]"], r"sharding_rules\[0\]: '\(' is not a regular expression"),
  ):
    with pytest.raises(ConfigError, match=message):
      build.check_names(tiny(aptos, "unfrozen_linear", *extra))
  # float32 matmuls run at model.matmul_precision, full float32 unless asked (XLA's GPU default is TF32).
  try:
    build.use_matmul_precision(tiny(aptos, "unfrozen_linear", "--config.model.matmul_precision=tensorfloat32"))
    assert jax.config.jax_default_matmul_precision == "tensorfloat32"
    build.use_matmul_precision(tiny(aptos, "unfrozen_linear"))
    assert jax.config.jax_default_matmul_precision == "highest"
  finally:
    jax.config.update("jax_default_matmul_precision", "highest")
  # Fields a run ignores are said, not refused: a sweep sets them for every cell.
  with caplog.at_level("WARNING", logger="mfjax"):
    build.check_names(tiny(aptos, "unfrozen_linear", "--config.data.uncertainty=ones",
                           f"--config.head.checkpoint={tmp_path}"))
  assert "data.uncertainty='ones' applies to CheXpert's uncertain labels only: ignored on aptos2019" in caplog.text
  assert "head.checkpoint is for the stacked DeiT-B head: ignored by protocol unfrozen_linear" in caplog.text
  # The patch size is the model's as the run builds it, its checkpoint's model.json included.
  from mfjax import models as mfjax_models
  small = dict(width=32, depth=1, heads=2, mlp_hidden=64, patch_size=8, native_resolution=(32, 32))
  mfjax_models.save(str(tmp_path / "deit8"), "deit_base_patch16", mfjax_models.init_params(
      mfjax_models.create("deit_base_patch16", **small), jax.random.PRNGKey(0)), small)
  paper = "configs/paper.py:model=deit_base_patch16,dataset=aptos2019,res=40"
  build.check_names(load_config(paper, [f"--config.model.checkpoint={tmp_path / 'deit8'}"]))
  # What result.json records of the checkpoints a run loads (a linear head's head.checkpoint is not read),
  # from which the report tells a changed architecture without the checkpoint at hand.
  recorded = build.checkpoint_models(load_config(paper + ",protocol=frozen_linear", [
      f"--config.model.checkpoint={tmp_path / 'deit8'}", "--config.head.checkpoint=/not/there"]))
  assert recorded == {"model": {"name": "deit_base_patch16", "overrides": dict(small, native_resolution=[32, 32])}}
  with pytest.raises(ConfigError, match="data.resolution=40 is not a multiple of deit_base_patch16's patch size 16"):
    build.check_names(load_config(paper, []))
  with pytest.raises(ConfigError, match=r"protocol.unfreeze_from=9 must be in 0..2"):
    build.foundation_spec(tiny(aptos, "progressive", "--config.protocol.unfreeze_from=9"))
  with pytest.raises(ConfigError, match=r"mesh.data=-1 x mesh.fsdp=3 does not divide the 1 device"):
    fit.parallel.make_mesh(-1, 3)
  from mfjax import models
  models.save(str(tmp_path / "resnet"), "resnet152", {"params": {"w": np.zeros(2)}}, {})
  with pytest.raises(ConfigError, match="holds a resnet152; the stacked head is a DeiT-B"):
    build.head_fields(tiny(aptos, "unfrozen_deit", f"--config.head.checkpoint={tmp_path / 'resnet'}"))
  # A training split smaller than one batch names the split and the batch.
  dataset = fit.open_dataset(tiny(aptos))
  with pytest.raises(mdata.DataError, match=r"split 'train' has \d+ examples, fewer than one batch of 512"):
    mdata.make_loader(dataset, "train", batch_size=512, train=True)


def test_the_stacked_head_takes_every_deit_tensor_and_nothing_else(aptos, tmp_path):
  from configs.tiny import TINY_FOUNDATION
  from mfjax import models
  deit = models.create("deit_base_patch16", **TINY_FOUNDATION["vit"])
  variables = jax.tree.map(lambda x: x + 0.5, models.init_params(deit, jax.random.PRNGKey(3)))
  models.save(str(tmp_path / "deit"), "deit_base_patch16", variables, dict(TINY_FOUNDATION["vit"]))
  run = fit.prepare(tiny(aptos, "unfrozen_deit", f"--config.head.checkpoint={tmp_path / 'deit'}"))
  stacked = flat(run.state["trainable"]["stacked"])
  for key, value in flat(variables["params"]).items():
    if not key.startswith("patch_embed/"):
      np.testing.assert_array_equal(stacked[key], value, err_msg=key)
  assert {k.split("/")[0] for k in stacked} - {k.split("/")[0] for k in flat(variables["params"])} == {
      "projector", "projector_norm", "fc"}  # the new layers, and only they, start fresh
  # A head deeper than the checkpoint is not topped up with random blocks.
  with pytest.raises(ConfigError, match="missing blocks_2"):
    fit.prepare(tiny(aptos, "unfrozen_deit", f"--config.head.checkpoint={tmp_path / 'deit'}",
                     "--config.head.overrides.depth=3"))
  # A ViT with parts the head has no place for (OpenCLIP's norm_pre and proj) is refused, not cut.
  clip = models.create("openclip_vitb16", **TINY_FOUNDATION["vit"])
  models.save(str(tmp_path / "clip"), "openclip_vitb16", models.init_params(clip, jax.random.PRNGKey(4)),
              dict(TINY_FOUNDATION["vit"]))
  with pytest.raises(ConfigError, match=r"has \['norm_pre', 'proj'\], which the stacked DeiT-B head"):
    fit.prepare(tiny(aptos, "unfrozen_deit", f"--config.head.checkpoint={tmp_path / 'clip'}"))
