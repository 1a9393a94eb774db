"""Converters refuse bad checkpoints with one error listing every problem, and write nothing; and
they read what releases actually ship (bf16 safetensors, wrapped keys, full training checkpoints)."""
import argparse
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm
import torch

from convert import core
from convert.__main__ import main as convert_main
from mfjax import models
from tests.parity import run_convert


@pytest.fixture(scope="module")
def deit_small_state():
  return timm.create_model("deit_small_patch16_224", pretrained=False).state_dict()


def refuse(tmp_path, checkpoint, *extra, match):
  out = tmp_path / "out"
  with pytest.raises(core.ConversionError, match=match) as err:
    run_convert(["deit", "--checkpoint", str(checkpoint), "--out", str(out), *extra])
  assert not out.exists(), "a failed conversion must leave no output"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
  return str(err.value)


def test_valid_small_checkpoint_converts(tmp_path, deit_small_state):
  path = tmp_path / "deit_small.pth"
  torch.save({"model": deit_small_state}, path)
  run_convert(["deit", "--checkpoint", str(path), "--out", str(tmp_path / "ok")])
  module, variables = models.load(tmp_path / "ok")
  assert (module.width, module.heads, module.depth) == (384, 6, 12)
  np.testing.assert_array_equal(np.asarray(variables["params"]["pos_embed"]),
                                deit_small_state["pos_embed"].numpy())


def test_all_problems_in_one_error(tmp_path, deit_small_state):
  state = dict(deit_small_state)
  state["blocks.3.attn.qkv_renamed.weight"] = state.pop("blocks.3.attn.qkv.weight")  # renamed
  state["blocks.5.mlp.fc1.weight"] = torch.zeros(1000, 384)                         # wrong shape
  del state["norm.bias"]                                                            # missing
  state["extra.thing"] = torch.zeros(3)                                             # unexpected
  path = tmp_path / "bad.pth"
  torch.save({"model": state}, path)
  msg = refuse(tmp_path, path, match="cannot convert")
  for needle in ("missing", "blocks.3.attn.qkv.weight", "norm.bias", "unexpected",
                 "blocks.3.attn.qkv_renamed.weight", "extra.thing", "mis-shaped",
                 "blocks.5.mlp.fc1.weight", "(1000, 384)"):
    assert needle in msg, f"{needle!r} not in error:\n{msg}"


def test_truncated_checkpoint(tmp_path, deit_small_state):
  path = tmp_path / "full.pth"
  torch.save({"model": deit_small_state}, path)
  cut = tmp_path / "deit_truncated.pth"
  cut.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
  msg = refuse(tmp_path, cut, match="truncated or corrupt")
  assert "deit_truncated.pth" in msg


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"model": {"x": _Payload(str(marker))}}, path)
  msg = refuse(tmp_path, path, match="refused to unpickle")
  assert "evil.pth" in msg and "GLOBAL posix.system" in msg
  assert not marker.exists(), "the checkpoint's code ran"


def test_existing_output_and_cli_exit_code(tmp_path, deit_small_state, capsys):
  path = tmp_path / "deit_small.pth"
  torch.save({"model": deit_small_state}, path)
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("user data")
  assert convert_main(["deit", "--checkpoint", str(path), "--out", str(out)]) == 1
  assert "not empty" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "user data" and len(list(out.iterdir())) == 1


def test_format_mismatch_and_missing_file(tmp_path, deit_small_state):
  path = tmp_path / "deit_small.pth"
  torch.save({"model": deit_small_state}, path)
  refuse(tmp_path, path, "--format", "hf", match="--format hf given")
  refuse(tmp_path, tmp_path / "nope.pth", match="does not exist")
  with pytest.raises(core.ConversionError, match="reads formats"):
    run_convert(["dino", "--checkpoint", str(_hf_folder(tmp_path)), "--out", str(tmp_path / "o")])


def _hf_folder(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text('{"model_type": "vit"}')
  from safetensors.numpy import save_file
  save_file({"x": np.zeros(2, np.float32)}, str(folder / "model.safetensors"))
  return folder


def test_hub_id_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  with pytest.raises(core.ConversionError, match="offline"):
    run_convert(["dinov2", "--checkpoint", "facebook/dinov2-base", "--out", str(tmp_path / "o")])


def test_registry_errors():
  with pytest.raises(ValueError, match="valid names:.*dinov2_vitb14"):
    models.create("dinov2_vitb16")
  with pytest.raises(ValueError, match="unknown option.*widht.*valid"):
    models.create("deit_base_patch16", widht=3)
  with pytest.raises(FileNotFoundError, match="not a converted mfjax model"):
    models.load("/nonexistent/model")


def test_object_store_save_writes_model_json_last(tmp_path, monkeypatch):
  """On gs:// (no folder rename) a model is params first, model.json last, so a save that fails
  leaves no folder that reads as a model; the same branch runs here on a local folder."""
  import orbax.checkpoint as ocp
  module = models.create("dinov3_vits16", depth=1)
  variables = models.init_params(module, image_size=(32, 32))
  monkeypatch.setattr(models, "is_remote", lambda path: True)
  real_save = ocp.StandardCheckpointer.save

  def failing(self, *args, **kwargs):
    raise OSError("connection reset")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing)
  with pytest.raises(OSError, match="connection reset"):
    models.save(str(tmp_path / "store"), "dinov3_vits16", variables, {"depth": 1})
  with pytest.raises(FileNotFoundError, match="not a converted mfjax model"):
    models.read_model_json(str(tmp_path / "store"))
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
  models.save(str(tmp_path / "store"), "dinov3_vits16", variables, {"depth": 1})
  _, loaded = models.load(str(tmp_path / "store"))
  np.testing.assert_array_equal(np.asarray(loaded["params"]["cls_token"]), np.asarray(variables["params"]["cls_token"]))
  with pytest.raises(FileExistsError, match="holds a model already"):
    models.save(str(tmp_path / "store"), "dinov3_vits16", variables, {"depth": 1})


def test_an_unfinished_save_of_a_job_is_written_again_by_one_process(tmp_path):
  """A multi-process job's export killed before its model.json leaves only params/ (orbax's own
  atomic folder); the run resumed by one process writes that model again instead of refusing it."""
  module = models.create("dinov3_vits16", depth=1)
  variables = models.init_params(module, image_size=(32, 32))
  out = tmp_path / "backbones" / "step_2"
  (out / "params.orbax-checkpoint-tmp-1").mkdir(parents=True)
  (out / "params").mkdir()
  models.save(str(out), "dinov3_vits16", variables, {"depth": 1})
  assert sorted(os.listdir(out)) == ["model.json", "params"]
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="exists and is not empty"):
    models.save(str(tmp_path / "other"), "dinov3_vits16", variables, {"depth": 1})


# ------------------------------------------------------------------- what releases ship


def _bf16(state):
  return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def test_bfloat16_safetensors(tmp_path, deit_small_state):
  from safetensors.torch import save_file
  path = tmp_path / "deit_small_bf16.safetensors"
  save_file(_bf16(deit_small_state), str(path))
  expected = deit_small_state["pos_embed"].to(torch.bfloat16).float().numpy()
  # In a fresh process that has not imported JAX (whose ml_dtypes teaches NumPy bfloat16).
  code = ("import sys, numpy as np; from convert import core; a = core.read_file(sys.argv[1])['pos_embed']; "
          "assert 'jax' not in sys.modules; np.save(sys.argv[2], a)")
  subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "pos.npy")], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  read = np.load(tmp_path / "pos.npy")
  assert read.dtype == np.float32
  np.testing.assert_array_equal(read, expected)
  run_convert(["deit", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
  _, variables = models.load(tmp_path / "out")
  np.testing.assert_array_equal(np.asarray(variables["params"]["pos_embed"]), expected)


def test_wrapper_prefixes_are_removed(tmp_path, deit_small_state, capsys):
  path = tmp_path / "ddp_compiled.pth"
  torch.save({"model": {f"module._orig_mod.{k}": v for k, v in deit_small_state.items()}}, path)
  run_convert(["deit", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
  assert "'module._orig_mod.'" in capsys.readouterr().out
  _, variables = models.load(tmp_path / "out")
  np.testing.assert_array_equal(np.asarray(variables["params"]["pos_embed"]), deit_small_state["pos_embed"].numpy())


class _Opaque:
  pass


def test_dino_full_checkpoint_with_args(tmp_path, deit_small_state):
  """DINO's full checkpoints keep their command line as an argparse.Namespace next to the weights."""
  backbone = {k: v for k, v in deit_small_state.items() if not k.startswith("head.")}
  teacher = {**{f"backbone.{k}": v for k, v in backbone.items()},
             "head.mlp.0.weight": torch.zeros(32, 384), "head.last_layer.weight_g": torch.ones(64, 1)}
  student = {f"module.{k}": v + 1 for k, v in teacher.items()}
  args = argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005, output_dir="/runs/dino")
  path = tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth"
  torch.save({"teacher": teacher, "student": student, "args": args, "epoch": 100,
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]}}, path)
  for extra, source in (((), teacher), (("--from-student",), student)):
    out = tmp_path / f"out{len(extra)}"
    run_convert(["dino", "--checkpoint", str(path), "--out", str(out), *extra])
    _, variables = models.load(out)
    np.testing.assert_array_equal(np.asarray(variables["params"]["pos_embed"]),
                                  source[("module." if extra else "") + "backbone.pos_embed"].numpy())
  other = tmp_path / "other.pth"
  torch.save({"teacher": teacher, "args": _Opaque()}, other)
  refused = r"Unsupported global: GLOBAL tests\.test_convert_errors\._Opaque was not an allowed global"
  with pytest.raises(core.ConversionError, match=refused):
    run_convert(["dino", "--checkpoint", str(other), "--out", str(tmp_path / "o")])


def test_numpy_scalars_pickled_under_either_numpy_major_load(tmp_path):
  """nnU-Net's checkpoint_final.pth keeps its best Dice as np.float64: written under NumPy 1 the
  pickle names numpy.core.multiarray, under NumPy 2 numpy._core.multiarray."""
  import zipfile
  written = tmp_path / "numpy2.pth"
  torch.save({"network_weights": {"w": torch.ones(2)}, "_best_ema": np.float64(0.5),
              "stats": np.arange(3.0)}, written)
  numpy1 = tmp_path / "numpy1.pth"
  with zipfile.ZipFile(written) as src, zipfile.ZipFile(numpy1, "w") as out:
    for info in src.infolist():
      data = src.read(info.filename)
      if info.filename.endswith("data.pkl"):
        assert b"cnumpy._core.multiarray\n" in data
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
      out.writestr(info, data)
  for path in (written, numpy1):
    loaded = core.read_file(str(path))
    assert loaded["_best_ema"] == 0.5 and list(loaded["stats"]) == [0.0, 1.0, 2.0]


def test_from_student_needs_a_checkpoint_with_a_student(tmp_path, deit_small_state):
  path = tmp_path / "dino_deitsmall16_pretrain.pth"
  torch.save({k: v for k, v in deit_small_state.items() if not k.startswith("head.")}, path)
  with pytest.raises(core.ConversionError, match="one set of weights.*without --from-student"):
    run_convert(["dino", "--checkpoint", str(path), "--out", str(tmp_path / "o"), "--from-student"])


def test_dinov2_training_teacher_checkpoint_converts_as_the_hub_file(tmp_path, deit_small_state):
  """DINOv2's eval/training_N/teacher_checkpoint.pth: {'teacher': {'backbone.*' (blocks in chunks
  with block_chunks > 0), 'dino_head.*', 'ibot_head.*'}}."""
  backbone = {k: v for k, v in deit_small_state.items() if not k.startswith("head.")}
  hub = tmp_path / "dinov2_vits14_pretrain.pth"
  torch.save(backbone, hub)
  chunked = {f"backbone.{k.replace('blocks.', f'blocks.{int(k.split(chr(46))[1]) // 3}.', 1)}"
             if k.startswith("blocks.") else f"backbone.{k}": v for k, v in backbone.items()}
  assert "backbone.blocks.3.11.norm1.weight" in chunked
  heads = {"dino_head.mlp.0.weight": torch.zeros(32, 384), "ibot_head.last_layer.weight_g": torch.ones(64, 1)}
  teacher = tmp_path / "teacher_checkpoint.pth"
  torch.save({"teacher": {**chunked, **heads}}, teacher)
  for path, out in ((hub, "hub"), (teacher, "teacher")):
    run_convert(["dinov2", "--checkpoint", str(path), "--out", str(tmp_path / out)])
  same = jax.tree_util.tree_map(np.array_equal, models.load(tmp_path / "hub")[1], models.load(tmp_path / "teacher")[1])
  assert all(jax.tree_util.tree_leaves(same))


# --------------------------------------------- OpenCLIP folders and Hub repos with two formats


@pytest.fixture(scope="module")
def laion_repo(module_tmp):
  """A folder laid out as laion's Hub repos: an HF CLIP model beside open_clip's own files."""
  import open_clip
  from safetensors.torch import save_file
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  folder = module_tmp.mktemp("laion")
  hf = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=1, image_size=32, patch_size=16,
                                                      projection_dim=16, hidden_act="gelu"))
  hf.save_pretrained(folder, safe_serialization=True)
  torch.save(hf.state_dict(), folder / "pytorch_model.bin")
  oc = open_clip.CLIP(16, dict(width=128, layers=2, patch_size=16, image_size=48),
                      dict(context_length=8, vocab_size=64, width=64, heads=1, layers=1))
  oc_state = {k: v.clone().contiguous() for k, v in oc.state_dict().items()}
  save_file(oc_state, str(folder / "open_clip_model.safetensors"))
  torch.save(oc_state, folder / "open_clip_pytorch_model.bin")
  hf_pos = hf.state_dict()["vision_model.embeddings.position_embedding.weight"].numpy()[None]
  return folder, hf_pos, oc_state["visual.positional_embedding"].numpy()[None]


def _converted(out):
  meta = models.read_model_json(out)
  _, variables = models.load(out)
  return meta["provenance"]["format"], np.asarray(variables["params"]["pos_embed"])


def test_openclip_folder_with_hf_and_open_clip_files(tmp_path, laion_repo):
  folder, hf_pos, oc_pos = laion_repo
  run_convert(["openclip", "--checkpoint", str(folder), "--out", str(tmp_path / "hf")])
  fmt, pos = _converted(tmp_path / "hf")
  assert fmt == "hf"
  np.testing.assert_array_equal(pos, hf_pos)
  run_convert(["openclip", "--checkpoint", str(folder), "--format", "original", "--out", str(tmp_path / "oc")])
  fmt, pos = _converted(tmp_path / "oc")
  assert fmt == "original"
  np.testing.assert_array_equal(pos, oc_pos)
  only = tmp_path / "only_open_clip"
  only.mkdir()
  shutil.copy(folder / "open_clip_model.safetensors", only)
  run_convert(["openclip", "--checkpoint", str(only), "--out", str(tmp_path / "only")])
  fmt, pos = _converted(tmp_path / "only")
  assert fmt == "original"
  np.testing.assert_array_equal(pos, oc_pos)
  with pytest.raises(core.ConversionError, match="--act quick_gelu given.*has hidden_act 'gelu'"):
    run_convert(["openclip", "--checkpoint", str(folder), "--act", "quick_gelu", "--out", str(tmp_path / "x")])


def test_hub_download_fetches_one_format(tmp_path, laion_repo, monkeypatch):
  import fnmatch
  import huggingface_hub
  folder = laion_repo[0]
  fetched = []

  def snapshot_download(repo_id, allow_patterns):
    dest = tmp_path / "snapshots" / str(len(fetched))
    dest.mkdir(parents=True)
    for name in os.listdir(folder):
      if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
        shutil.copy(folder / name, dest)
    fetched.append(sorted(os.listdir(dest)))
    return str(dest)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.chdir(tmp_path)
  run_convert(["openclip", "--checkpoint", "laion/CLIP-test", "--out", "hf"])
  assert fetched == [["config.json", "model.safetensors"]]
  assert _converted(tmp_path / "hf")[0] == "hf"
  run_convert(["openclip", "--checkpoint", "laion/CLIP-test", "--format", "original", "--out", "oc"])
  assert fetched[1:] == [["open_clip_model.safetensors"]]
  assert _converted(tmp_path / "oc")[0] == "original"


# ------------------------------------------------------------------------------- DINOv3


class _Dinov3Args:
  ln_eps = None
  checkpoint = "test checkpoint"
  rope_dtype = "float32"


@pytest.fixture(scope="module")
def dinov3_small_state():
  from benchmarks.nnunet_reference import official_state
  return {k: core.to_numpy(v) for k, v in official_state(384, 12, 6, seed=3).items()}


def test_dinov3_sat493m_local_cls_norm_is_ignored(dinov3_small_state):
  from convert import dinov3
  sat = dict(dinov3_small_state, **{"local_cls_norm.weight": np.ones(384, np.float32),
                                   "local_cls_norm.bias": np.zeros(384, np.float32)})
  name, _, variables = dinov3.from_checkpoint(sat, None, "original", _Dinov3Args())
  _, _, plain = dinov3.from_checkpoint(dinov3_small_state, None, "original", _Dinov3Args())
  assert name == "dinov3_vits16"
  for a, b in zip(*(jax.tree_util.tree_leaves(v) for v in (variables, plain)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_dinov3_swiglu_variant_is_refused_as_such(dinov3_small_state):
  from convert import dinov3
  splus = {k: v for k, v in dinov3_small_state.items() if ".mlp." not in k}
  for i in range(12):
    splus.update({f"blocks.{i}.mlp.w1.weight": np.zeros((1536, 384), np.float32),
                  f"blocks.{i}.mlp.w2.weight": np.zeros((1536, 384), np.float32),
                  f"blocks.{i}.mlp.w3.weight": np.zeros((384, 1536), np.float32)})
  with pytest.raises(core.ConversionError) as err:
    dinov3.from_checkpoint(splus, None, "original", _Dinov3Args())
  msg = str(err.value)
  assert "ViT-S+/16" in msg and "SwiGLU" in msg and "not supported" in msg
  assert "missing" not in msg and len(msg.splitlines()) == 1


def test_a_pth_file_without_torch_installed_says_how_to_install_it(tmp_path, monkeypatch):
  path = tmp_path / "model.pth"
  path.write_bytes(b"\x80\x02}q\x00.")
  monkeypatch.setitem(sys.modules, "torch", None)  # the core install: no torch
  with pytest.raises(core.ConversionError, match=r"model.pth: reading a PyTorch checkpoint needs torch: pip install"):
    core.read_file(str(path))


def test_family_flags_are_known_wherever_the_family_is_named(tmp_path):
  from convert.__main__ import build_parser, run
  args = build_parser("sam").parse_args(["--checkpoint", "x.pth", "--out", "o", "sam", "--no-neck"])
  assert args.family == "sam" and args.no_neck
  with pytest.raises(Exception, match="does not exist|not found|No such"):  # parsed; then the missing file
    run(["--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path / "o"), "sam", "--no-neck"])


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path, deit_small_state):
  for name, content, says in (
      ("page.pth", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "an HTML or XML page"),
      ("lfs.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 343249\n", "Git LFS pointer"),
      ("notes.pth", b"these are not weights\n", "neither a zip archive nor a pickle"),
      ("empty.pth", b"", "an empty file"),
      ("model.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer")):
    (tmp_path / name).write_bytes(content)
    assert name in refuse(tmp_path, tmp_path / name, match=says)
  # a safetensors file under a torch name is read as what it is
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in deit_small_state.items()}, str(tmp_path / "renamed.pth"))
  run_convert(["deit", "--checkpoint", str(tmp_path / "renamed.pth"), "--out", str(tmp_path / "converted")])
  assert (tmp_path / "converted" / models.MODEL_JSON).exists()


def test_a_damaged_converted_model_is_named_with_what_is_wrong(tmp_path):
  import json
  from mfjax.config import ConfigError
  overrides = dict(width=32, depth=2, heads=2, mlp_hidden=64, patch_size=8, native_resolution=(32, 32))
  good = str(tmp_path / "good")
  models.save(good, "deit_base_patch16", models.init_params(models.create("deit_base_patch16", **overrides),
                                                              jax.random.PRNGKey(0)), overrides)

  def damaged(name, damage):
    folder = tmp_path / name
    shutil.copytree(good, folder)
    damage(folder)
    return str(folder)

  cut = damaged("cut", lambda f: (f / models.MODEL_JSON).write_text((f / models.MODEL_JSON).read_text()[:20]))
  with pytest.raises(ConfigError, match=r"cut/model.json is damaged"):
    models.load(cut)

  def deeper(folder):
    meta = json.loads((folder / models.MODEL_JSON).read_text())
    meta["overrides"]["depth"] = 3
    (folder / models.MODEL_JSON).write_text(json.dumps(meta))
  with pytest.raises(ConfigError, match=r"deeper/params does not hold the deit_base_patch16 that model.json describes"
                                        r"(.|\n)*missing params/blocks_2/attn/proj/bias"):
    models.load(damaged("deeper", deeper))

  def truncate_largest(folder):
    data = max((folder / "params").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    data.write_bytes(data.read_bytes()[:40])
  with pytest.raises(ConfigError, match=r"truncated/params: its tensors cannot be read .*convert the checkpoint again"):
    models.load(damaged("truncated", truncate_largest))
