"""Converters refuse bad checkpoints with one error listing every problem, and write nothing."""
import os

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
  assert "evil.pth" in msg
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
