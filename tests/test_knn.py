"""k-NN against a brute-force NumPy transcription of the paper's knn_predict; the feature cache."""
import json
import os
import shutil

import numpy as np
import pytest
import scipy.special

from mfjax.evals import knn, metrics
from mfjax.report import results as report_results


def brute_force(bank, targets, queries, k, temperature):
  """Per query: cosine similarity to every bank row, the k largest, weights exp(sim/T) normalized
  to sum 1, weighted sum of the neighbours' label vectors (one-hot or multi-hot)."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  scores, neighbours = [], []
  for q in queries:
    sims = bank @ (q / np.linalg.norm(q))
    order = np.argsort(-sims, kind="stable")[:k]
    weights = np.exp(sims[order] / temperature)
    scores.append((weights[:, None] * targets[order]).sum(axis=0) / weights.sum())
    neighbours.append(order)
  return np.array(scores), np.array(neighbours)


def clustered(rng, sizes, num_classes, dim=24):
  """Bank and query features around shared class centres, with their labels."""
  centres = rng.normal(size=(num_classes, dim))
  out = []
  for n in sizes:
    labels = rng.integers(0, num_classes, n)
    out += [(centres[labels] + 0.7 * rng.normal(size=(n, dim))).astype(np.float32), labels]
  return out


def test_multiclass_equals_brute_force_across_query_blocks(monkeypatch):
  rng = np.random.default_rng(0)
  bank, bank_labels, queries, _ = clustered(rng, (300, 23), 5)
  monkeypatch.setattr(knn, "SIMILARITY_BLOCK", 300 * 5)  # 5 queries per block; the last block is padded
  sims, indices = knn.nearest_neighbours(bank, queries, 40)
  _, ref_indices = brute_force(bank.astype(np.float64), np.eye(5)[bank_labels], queries.astype(np.float64), 40, 0.1)
  np.testing.assert_array_equal(indices, ref_indices)
  assert np.all(np.diff(sims, axis=1) <= 0)
  many = knn.knn_predict_many(bank, bank_labels, queries, ks=(1, 10, 40), temperature=0.1, num_classes=5)
  for k in (1, 10, 40):
    ref, _ = brute_force(bank.astype(np.float64), np.eye(5)[bank_labels], queries.astype(np.float64), k, 0.1)
    np.testing.assert_allclose(many[k], ref, atol=1e-5)
    np.testing.assert_allclose(many[k].sum(axis=1), 1.0, atol=1e-12)
  single = knn.knn_predict(bank, bank_labels, queries, k=10, num_classes=5)
  np.testing.assert_array_equal(single, many[10])


def test_multilabel_equals_brute_force():
  rng = np.random.default_rng(1)
  bank = rng.normal(size=(250, 16)).astype(np.float32)
  bank_labels = (rng.random((250, 6)) < 0.3).astype(np.int64)
  queries = rng.normal(size=(17, 16)).astype(np.float32)
  for k, temperature in ((200, 0.1), (7, 0.5)):
    scores = knn.knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=6,
                             multi_label=True)
    ref, _ = brute_force(bank.astype(np.float64), bank_labels.astype(np.float64), queries.astype(np.float64), k,
                         temperature)
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    assert scores.shape == (17, 6) and scores.min() >= 0 and scores.max() <= 1


def test_tiny_temperature_does_not_overflow():
  """exp(sim/T) overflows float64 for T = 1e-4 (sim/T up to 1e4); the weights are softmax(sim/T)."""
  rng = np.random.default_rng(2)
  bank, bank_labels, queries, _ = clustered(rng, (100, 10), 4)
  scores = knn.knn_predict(bank, bank_labels, queries, k=20, temperature=1e-4, num_classes=4)
  sims, neighbours = knn.nearest_neighbours(bank, queries, 20)
  weights = scipy.special.softmax(sims.astype(np.float64) / 1e-4, axis=1)
  np.testing.assert_allclose(scores, np.einsum("nk,nkc->nc", weights, np.eye(4)[bank_labels[neighbours]]),
                             atol=1e-9)
  assert np.all(np.isfinite(scores))
  np.testing.assert_array_equal(scores.argmax(axis=1), bank_labels[neighbours[:, 0]])


def test_knn_evaluate_scores_every_k_with_the_metrics():
  rng = np.random.default_rng(3)
  bank, bank_labels, queries, query_labels = clustered(rng, (200, 60), 3)
  out = knn.knn_evaluate(bank, bank_labels, queries, query_labels, ks=(5, 50), num_classes=3, multi_label=False,
                         headline="quadratic_kappa")
  assert sorted(out) == ["5", "50"]
  for k in (5, 50):
    ref, _ = brute_force(bank.astype(np.float64), np.eye(3)[bank_labels], queries.astype(np.float64), k, 0.1)
    expected = metrics.evaluate(ref, query_labels, multi_label=False, headline="quadratic_kappa")
    assert out[str(k)]["headline"] == pytest.approx(expected["headline"])
    assert out[str(k)]["accuracy"] == pytest.approx(expected["accuracy"])
  assert out["5"]["accuracy"] > 0.9  # clustered data is separable: the vote works

  bank_multi = (rng.random((200, 4)) < 0.5).astype(np.int64)
  query_multi = (rng.random((60, 4)) < 0.5).astype(np.int64)
  multi = knn.knn_evaluate(bank, bank_multi, queries, query_multi, ks=(10,), num_classes=4, multi_label=True,
                           headline="mean_auc")
  ref, _ = brute_force(bank.astype(np.float64), bank_multi.astype(np.float64), queries.astype(np.float64), 10, 0.1)
  assert multi["10"]["headline"] == pytest.approx(metrics.mean_roc_auc(query_multi, ref)[0])


def test_result_json_is_what_the_report_reads(tmp_path):
  per_k = {"10": {"headline": 0.61, "accuracy": 0.7}, "200": {"headline": 0.55, "accuracy": 0.6}}
  data = knn.result_json(model="dino_vitb16", dataset="aptos2019", resolution=224,
                         headline_metric="quadratic_kappa", results=per_k, checkpoint="/ckpt/dino")
  path = tmp_path / "knn.json"
  path.write_text(json.dumps(data))
  read = report_results.read_knn(str(path))
  assert read["scores"] == {10: 0.61, 200: 0.55}
  assert (read["model"], read["label"], read["dataset"], read["resolution"]) == (
      "dino_vitb16", "dino_vitb16", "aptos2019", 224)
  with pytest.raises(ValueError, match="no 'headline'"):
    knn.result_json(model="m", dataset="d", resolution=1, headline_metric="x", results={"5": {"accuracy": 1}})


@pytest.mark.parametrize("change, message", [
    (dict(k=301), "k=301 must be between 1 and the bank size 300"),
    (dict(query=np.ones((3, 7))), "bank features have 8 dimensions, query features 7"),
    (dict(labels=np.full(300, 5)), r"class ids \[5\] outside 0..4"),
    (dict(labels=np.zeros(299, int)), "300 bank features but 299 bank labels"),
    (dict(bank=np.where(np.arange(300)[:, None] == 7, np.nan, 1.0) * np.ones((300, 8))),
     r"bank_features has non-finite values in 1 rows, first rows \[7\]"),
    (dict(temperature=0.0), "temperature must be positive"),
])
def test_bad_input_is_named(change, message):
  rng = np.random.default_rng(4)
  args = dict(bank=rng.normal(size=(300, 8)), labels=rng.integers(0, 5, 300), query=rng.normal(size=(3, 8)), k=10,
              temperature=0.1)
  args.update(change)
  with pytest.raises(ValueError, match=message):
    knn.knn_predict(args["bank"], args["labels"], args["query"], k=args["k"], temperature=args["temperature"],
                    num_classes=5)


def test_multilabel_labels_must_be_binary():
  with pytest.raises(ValueError, match=r"must hold 0/1 values, got \[-1, 0, 1\]"):
    knn.knn_predict(np.eye(4), np.array([[1, 0], [0, -1], [1, 1], [0, 0]]), np.eye(4), k=2, num_classes=2,
                    multi_label=True)


# ----------------------------------------------------------------------------- feature cache


def test_feature_cache_computes_once_per_key(tmp_path):
  cache = knn.FeatureCache(str(tmp_path / "cache"))
  calls = []

  def compute():
    calls.append(1)
    return {"features": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.array([0, 1, 2])}

  key = {"model": "dinov2_vitb14", "checkpoint": {"path": ""}, "dataset": "/data/aptos", "split": "train",
         "resolution": 224, "transform": "eval"}
  first = cache.get_or_compute(key, compute)
  second = cache.get_or_compute(dict(reversed(list(key.items()))), compute)  # same key, other order
  assert len(calls) == 1
  for name in ("features", "labels"):
    np.testing.assert_array_equal(first[name], second[name])
  assert second["features"].dtype == np.float32
  cache.get_or_compute(dict(key, split="test"), compute)
  assert len(calls) == 2
  with open(cache.path(key)[:-4] + ".json") as f:
    assert json.load(f) == key


def test_cache_command_lists_and_prunes_by_last_use_and_size(tmp_path, capsys):
  from mfjax import cli
  root = tmp_path / "cache"
  cache = knn.FeatureCache(str(root))
  day = 86400
  now = 1_800_000_000.0
  key = lambda split, model="dinov2_vitb14": {"model": model, "checkpoint": {"path": "/ckpt/" + model},
                                            "dataset": "/data/aptos2019/", "split": split, "resolution": 224}
  paths = {}
  for split, model, age_days in (("train", "dinov2_vitb14", 40), ("test", "dinov2_vitb14", 10),
                                 ("train", "sam_vitb", 1)):
    paths[split, model] = cache.put(key(split, model), {"features": np.zeros((250, 1000), np.float32)})  # 1 MB
    for p in (paths[split, model], paths[split, model][:-4] + ".json"):
      os.utime(p, (now - age_days * day, now - age_days * day))
  killed = root / "tmpab12.tmp"  # a write killed midway, two days ago
  killed.write_bytes(b"partial")
  others = [root / "notes.json", root / "features.npz", root / "draft.tmp"]  # not the cache's: kept
  for path in [killed] + others:
    path.write_bytes(b"x")
    os.utime(path, (now - 2 * day, now - 2 * day))
  listing = knn.cache_listing(str(root), now=now)
  assert "3 entries, 3.0 MB" in listing
  assert "| dinov2_vitb14 | aptos2019 | train | 224 | /ckpt/dinov2_vitb14 |" in listing
  assert listing.index("dinov2_vitb14 | aptos2019 | train") < listing.index("| sam_vitb")  # least recently used first
  plan = knn.cache_listing(str(root), unused_days=30, max_gb=0.0015, now=now)  # 30 days, then down to 1.5 MB
  assert "would delete: 2 entries (2.0 MB)" in plan and "1 files left by killed writes" in plan and "--prune" in plan
  assert len(os.listdir(root)) == 10
  # A read counts as a use: the 40-day-old entry read now stays, and the size rule takes the next one.
  os.utime(paths["train", "dinov2_vitb14"][:-4] + ".json", (now, now))
  assert "deleted: 2 entries" in knn.cache_listing(str(root), unused_days=30, max_gb=0.0015, prune=True, now=now)
  kept = paths["train", "dinov2_vitb14"]
  assert sorted(os.listdir(root)) == sorted([os.path.basename(p) for p in (kept, kept[:-4] + ".json")]
                                            + ["draft.tmp", "features.npz", "notes.json"])
  key_file = paths["train", "dinov2_vitb14"][:-4] + ".json"
  os.utime(key_file, (1e9, 1e9))
  cache.get(key("train"))  # a use: the key file's time is now's
  assert os.path.getmtime(key_file) > 1e9
  with pytest.raises(SystemExit):
    cli.main(["cache", "--cache", str(root), "--prune"])
  assert "--unused-days or --max-gb" in capsys.readouterr().err
  assert cli.main(["cache", "--cache", str(root), "--unused-days", "0", "--prune"]) == 0
  assert "deleted: 1 entries" in capsys.readouterr().out
  assert sorted(os.listdir(root)) == ["draft.tmp", "features.npz", "notes.json"]
  assert knn.cache_listing(str(root)) == f"feature cache {root}: no entries"
  cache.put(dict(key("test"), checkpoint="random:model:0"), {"features": np.zeros(2)})
  cache.put(dict(key("train"), checkpoint={"path": ""}), {"features": np.zeros(2)})
  # A built dataset's path ends in its name, build config and version: the listing shows the first two.
  cache.put(dict(key("test"), dataset="/d/chexpert/frontal-seeded0-1a2b3c4d/1.0.0"), {"features": np.zeros(2)})
  listing = knn.cache_listing(str(root))
  assert "| random:model:0 |" in listing and "| random init |" in listing
  assert "| dinov2_vitb14 | chexpert/frontal-seeded0-1a2b3c4d | test |" in listing


def test_feature_cache_corruption_names_the_file(tmp_path):
  cache = knn.FeatureCache(str(tmp_path))
  key = {"model": "m"}
  cache.put(key, {"x": np.zeros(3)})
  path = cache.path(key)
  with open(path, "wb") as f:
    f.write(b"not a zip file")
  with pytest.raises(knn.CacheError, match=f"feature cache file {path} is corrupt"):
    cache.get(key)
  with pytest.raises(TypeError, match="JSON-serializable"):
    cache.path({"model": object()})
  with pytest.raises(TypeError, match="non-empty dict of arrays"):
    cache.put(key, [np.zeros(3)])
  failing = knn.FeatureCache(str(tmp_path / "other"))
  with pytest.raises(RuntimeError, match="interrupted"):
    failing.get_or_compute(key, lambda: (_ for _ in ()).throw(RuntimeError("interrupted")))
  assert failing.get(key) is None  # nothing half-written is taken for a result
  cache.put(key, {"x": np.ones(3)})
  os.unlink(path[:-4] + ".json")  # pruned between the listing and the read: a miss, computed again
  assert cache.get(key) is None


def test_feature_cache_processes_take_the_same_branch(tmp_path, monkeypatch):
  """Computing features runs collectives: every process computes when any one misses the entry
  (here another process, whose code the gather reports), and stops when any one cannot read it."""
  cache = knn.FeatureCache(str(tmp_path))
  key, calls = {"model": "m"}, []
  compute = lambda: calls.append(1) or {"x": np.arange(3.0)}
  cache.get_or_compute(key, compute)
  others = {}
  monkeypatch.setattr(knn.parallel, "gathered", lambda code: np.array([code, others["code"]]))
  others["code"] = 0   # a hit everywhere: read, not computed
  cache.get_or_compute(key, compute)
  assert len(calls) == 1
  others["code"] = 1   # a miss on the other process: computed here too
  np.testing.assert_array_equal(cache.get_or_compute(key, compute)["x"], np.arange(3.0))
  assert len(calls) == 2
  others["code"] = 2   # unreadable there
  with pytest.raises(knn.CacheError, match=r"unreadable on process\(es\) \[1\]"):
    cache.get_or_compute(key, compute)
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_feature_cache_that_cannot_store_warns_and_goes_on(tmp_path, caplog):
  """A full disk (here: the cache root is a file) loses the entry, not the run: every process goes
  on with the features it computed, none waits for another that stopped."""
  (tmp_path / "cache").write_text("")
  cache = knn.FeatureCache(str(tmp_path / "cache"))
  with caplog.at_level("WARNING", logger="mfjax"):
    out = cache.get_or_compute({"model": "m"}, lambda: {"x": np.arange(3.0)})
  np.testing.assert_array_equal(out["x"], np.arange(3.0))
  assert f"feature cache {tmp_path / 'cache'}: cannot store this entry" in caplog.text


def test_fingerprint_changes_with_the_checkpoint(tmp_path):
  folder = tmp_path / "ckpt"
  (folder / "params").mkdir(parents=True)
  (folder / "params" / "data").write_bytes(b"0" * 10)
  (folder / "model.json").write_text("{}")
  before = knn.fingerprint(str(folder))
  assert before["files"] == 2 and before["bytes"] == 12
  (folder / "params" / "data").write_bytes(b"0" * 11)
  os.utime(folder / "params" / "data", ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))
  assert knn.fingerprint(str(folder)) != before
  assert knn.fingerprint("") == {"path": ""}
  with pytest.raises(FileNotFoundError, match="missing"):
    knn.fingerprint(str(tmp_path / "missing"))
  # An object store's model (gs://) is known by its model.json and orbax's save times (the same code
  # reads a local folder here; epath opens gs:// alike).
  from mfjax import models
  models.save(str(tmp_path / "model"), "deit_base_patch16", {"params": {"w": np.zeros(3)}}, {})
  first = knn._remote_fingerprint(str(tmp_path / "model"))
  assert '"deit_base_patch16"' in first["model_json"] and "commit_timestamp_nsecs" in first["saved"]
  shutil.rmtree(tmp_path / "model")
  models.save(str(tmp_path / "model"), "deit_base_patch16", {"params": {"w": np.ones(3)}}, {})
  assert knn._remote_fingerprint(str(tmp_path / "model")) != first
  with pytest.raises(FileNotFoundError, match="no model.json"):
    knn._remote_fingerprint(str(tmp_path / "missing"))
  with pytest.raises(knn.CacheError, match="the cache is a local folder"):
    knn.FeatureCache("gs://bucket/features")
