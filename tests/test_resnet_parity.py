"""ResNet-152 against torchvision and timm (eval, plus one train-mode BatchNorm step); `convert resnet`."""
import functools
import json

import jax
from flax.traverse_util import flatten_dict, unflatten_dict
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from convert import resnet
from convert.__main__ import main as convert_main
from mfjax import models

RTOL = 1e-4


def assert_close(name, got, ref):
  got, ref = np.asarray(got), np.asarray(ref)
  assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert err <= RTOL, f"{name}: max|diff| / max|ref| = {err:.2e} > {RTOL}"
  return err


def randomize(model, seed):
  """Random BatchNorm affine parameters and running statistics (torch inits them to 1, 0, 0, 1).

  The last BatchNorm of each bottleneck gets small scales so that 50 residual additions keep
  activations in a range where a relative tolerance is meaningful.
  """
  gen = torch.Generator().manual_seed(seed)
  uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=gen)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(uniform(c, 0.1, 0.3) if name.endswith("bn3") else uniform(c, 0.5, 1.5))
        module.bias.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_var.copy_(uniform(c, 0.5, 1.5))
  return model.eval()


def images(batch, size, seed=0):
  return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def tokens(x):
  return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]).numpy()


def reference_stages(model, x):
  """Outputs of layer1..layer4 (NCHW) of a torchvision or timm ResNet."""
  outs = {}
  hooks = [getattr(model, f"layer{s}").register_forward_hook(
      lambda mod, inp, out, s=s: outs.__setitem__(s, out.detach().clone())) for s in range(1, 5)]
  try:
    with torch.no_grad():
      model(x)
  finally:
    for hook in hooks:
      hook.remove()
  return [outs[s] for s in range(1, 5)]


def check_eval_parity(module, variables, ref_model, x):
  stages = reference_stages(ref_model, x)
  out = jax.jit(functools.partial(module.apply, return_blocks=True))(variables, nhwc(x))
  assert len(out["blocks"]) == 4
  for s, (got, want) in enumerate(zip(out["blocks"], stages)):
    assert_close(f"layer{s + 1}", got, tokens(want))
  assert_close("tokens", out["tokens"], tokens(stages[-1]))
  assert_close("pooled", out["pooled"], stages[-1].mean(dim=(2, 3)).numpy())
  assert out["pooled"].shape == (x.shape[0], 2048)
  assert module.token_grid(tuple(x.shape[2:])) == tuple(stages[-1].shape[2:])


@pytest.fixture(scope="module")
def tv_resnet():
  torch.manual_seed(0)
  return randomize(torchvision.models.resnet152(), seed=0)


@pytest.fixture(scope="module")
def tv_converted(tv_resnet, module_tmp):
  """torchvision's file (what torch.hub downloads): a flat state dict, model found from its keys."""
  path = str(module_tmp.mktemp("tv") / "resnet152-394f9c45.pth")
  torch.save(tv_resnet.state_dict(), path)
  out = str(module_tmp.mktemp("tv_out") / "resnet152")
  assert convert_main(["resnet", "--checkpoint", path, "--out", out]) == 0
  assert models.read_model_json(out)["name"] == "resnet152"
  return models.load(out)


def test_torchvision_resnet152_parity(tv_resnet, tv_converted):
  module, variables = tv_converted
  check_eval_parity(module, variables, tv_resnet, images(2, (224, 224)))


def test_timm_resnet152_parity_from_hf_folder(tmp_path):
  """timm's resnet152 as a Hugging Face folder, at a non-native, non-square size."""
  torch.manual_seed(1)
  ref = randomize(timm.create_model("resnet152", pretrained=False), seed=1)
  folder = tmp_path / "resnet152.a1h_in1k"
  folder.mkdir()
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({"architecture": "resnet152", "num_classes": 1000}))
  out = str(tmp_path / "out")
  assert convert_main(["resnet", "--checkpoint", str(folder), "--out", out]) == 0
  module, variables = models.load(out)
  check_eval_parity(module, variables, ref, images(1, (200, 264), seed=1))


def test_resnet152_train_step_batchnorm(tv_resnet, tv_converted):
  """With train=True: batch statistics in the forward, torch's running-average update after it."""
  module, variables = tv_converted
  ref = torchvision.models.resnet152()
  ref.load_state_dict(tv_resnet.state_dict())
  ref.train()
  x = images(2, (224, 224), seed=2)
  stages = reference_stages(ref, x)
  out, updated = jax.jit(functools.partial(module.apply, train=True, mutable=["batch_stats"]))(
      variables, nhwc(x))
  assert_close("train tokens", out["tokens"], tokens(stages[-1]))
  assert_close("train pooled", out["pooled"], stages[-1].mean(dim=(2, 3)).numpy())
  state = ref.state_dict()
  new_stats = flatten_dict(updated["batch_stats"])
  old_stats = flatten_dict(variables["batch_stats"])
  assert len(new_stats) == 2 * 155
  for path, value in new_stats.items():
    *block, bn, stat = path  # e.g. ('layer1_0', 'downsample_bn', 'var')
    prefix = "".join(f"{b.replace('_', '.')}." for b in block)
    key = f"{prefix}{bn.replace('downsample_bn', 'downsample.1')}.running_{stat}"
    assert_close(key, value, state[key].numpy())
    # The update itself, ~10x smaller than the statistic, must match too (torch's unbiased variance).
    torch_update = state[key].numpy() - tv_resnet.state_dict()[key].numpy()
    assert_close(f"{key} update", np.asarray(value) - np.asarray(old_stats[path]), torch_update)


def test_resnet_num_stages_cuts_after_a_stage(tv_resnet, tv_converted):
  module, variables = tv_converted
  cut = models.create("resnet152", num_stages=2)
  needed = flatten_dict(models.abstract_variables(cut))
  kept = {k: v for k, v in flatten_dict(variables).items() if k in needed}
  assert len(kept) == len(needed)
  x = images(1, (64, 96), seed=3)
  out = jax.jit(cut.apply)(unflatten_dict(kept), nhwc(x))
  layer2 = reference_stages(tv_resnet, x)[1]
  assert out["pooled"].shape == (1, 512) and len(jax.tree_util.tree_leaves(out)) == 2
  assert_close("layer2 tokens", out["tokens"], tokens(layer2))


@pytest.mark.parametrize("size", [(33, 47), (64, 64), (95, 160)])
def test_resnet_token_grid(tv_resnet, size):
  module = models.create("resnet152")
  grids = [tuple(s.shape[2:]) for s in reference_stages(tv_resnet, torch.zeros(1, 3, *size))]
  assert module.stage_grids(size) == grids
  assert module.token_grid(size) == grids[-1]


def test_registered_resnets_match_torchvision():
  for name, builder in [("resnet50", torchvision.models.resnet50),
                        ("resnet101", torchvision.models.resnet101),
                        ("resnet152", torchvision.models.resnet152)]:
    with torch.device("meta"):
      ref = builder()
    state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
    assert resnet.detect_model(state, name) == name
    variables = resnet.convert(state, model=name, source=name)  # strict: every key and shape
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    assert n_params == sum(p.numel() for k, p in ref.named_parameters() if not k.startswith("fc."))


def test_resnet_converter_refuses_a_wrong_checkpoint_listing_every_problem(tv_resnet, tmp_path, capsys):
  state = dict(tv_resnet.state_dict())
  del state["layer3.35.bn2.running_var"]
  state["layer4.0.downsample.0.weight"] = torch.zeros(2048, 1024, 3, 3)
  state["layer2.0.se.fc1.weight"] = torch.zeros(8, 512)
  path = str(tmp_path / "bad.pth")
  torch.save({"state_dict": state, "epoch": 7}, path)
  out = tmp_path / "out"
  assert convert_main(["resnet", "--checkpoint", path, "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "missing in" in err and "layer3.35.bn2.running_var" in err
  assert "unexpected keys" in err and "layer2.0.se.fc1.weight" in err
  assert "mis-shaped" in err and "layer4.0.downsample.0.weight" in err
  assert "fc.weight" not in err and "num_batches_tracked" not in err
  assert not out.exists()


def test_resnet_converter_refuses_other_checkpoints(tmp_path, capsys):
  path = str(tmp_path / "resnet152d.pth")
  torch.save({"conv1.0.weight": torch.zeros(32, 3, 3, 3),  # timm's deep stem, 3 blocks per stage
              **{f"layer{s}.{b}.conv1.weight": torch.zeros(1) for s in (1, 2, 3, 4) for b in range(3)}},
             path)
  assert convert_main(["resnet", "--checkpoint", path, "--out", str(tmp_path / "a")]) == 1
  assert "match no registered ResNet" in capsys.readouterr().err
  folder = tmp_path / "hf"
  folder.mkdir()
  save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({"architecture": "resnet152d"}))
  assert convert_main(["resnet", "--checkpoint", str(folder), "--out", str(tmp_path / "b")]) == 1
  assert "architecture 'resnet152d'" in capsys.readouterr().err
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _widest_fusion(compiled) -> int:
  """The most operands of any fusion in a compiled XLA:CPU program's entry computation."""
  import re
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  return max(m.group(1).count("%") for m in re.finditer(r" fusion\((.*?)\), kind=", entry))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the materialisation is XLA:CPU's")
def test_residual_stream_is_stored_once_and_changes_no_number(monkeypatch):
  """XLA:CPU fused each block's relu(x + bn(conv)) into its consumers and recomputed it from
  every earlier block's conv output, forward and backward (fusions with ~150 operands in
  ResNet-152). `resnet.materialized` stores it once; loss, gradients and statistics stay the same."""
  from mfjax.models import resnet as resnet_model
  model = resnet_model.Model(depths=(1, 10), num_stages=2)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  def loss(params):
    out, updated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                               mutable=["batch_stats"])
    return jnp.sum(out["pooled"] ** 2), updated["batch_stats"]

  def compiled():
    return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables["params"]).compile()

  stored = compiled()
  monkeypatch.setattr(resnet_model, "materialized", lambda x, token: x)
  fused = compiled()
  # Nine identical blocks: the fused chain reads the conv outputs of all of them (4 operands each).
  assert _widest_fusion(fused) > 30 and _widest_fusion(stored) <= 12, (_widest_fusion(fused), _widest_fusion(stored))
  (loss_stored, stats_stored), grads_stored = stored(variables["params"])
  (loss_fused, stats_fused), grads_fused = fused(variables["params"])
  assert_close("loss", loss_stored, loss_fused)
  for (path, got), ref in zip(flatten_dict(grads_stored).items(), flatten_dict(grads_fused).values()):
    assert_close(f"gradient {'/'.join(path)}", got, ref)
  for (path, got), ref in zip(flatten_dict(stats_stored).items(), flatten_dict(stats_fused).values()):
    assert_close(f"batch_stats {'/'.join(path)}", got, ref)
