"""FocalNet: SEEM's FocalNet-T and timm's FocalNet family against PyTorch, and `convert seem`.

The SEEM reference is timm's FocalNet with the three changes that make it SEEM's focal_dw
(depthwise residual convs, LayerNorm after the residual add, stem padding 3) plus SEEM's
per-stage output norms (`benchmarks.torch_reference.seem_focalt_net`, which the benchmarks time
too); its weights are saved under SEEM's original names (all 300 keys).
"""
import functools
import json
import re
import types

import jax
from flax.traverse_util import flatten_dict, unflatten_dict
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models import create_model
from timm.models.focalnet import FocalNet

from benchmarks import torch_reference
from convert import core, seem
from convert.__main__ import main as convert_main
from mfjax import models
from mfjax.models import focalnet

RTOL = 1e-4
SEEM_DIMS, SEEM_DEPTHS = (96, 192, 384, 768), (2, 2, 6, 2)
TIMM_NAMES = tuple(n for n in focalnet.MODELS if n.startswith("focalnet_"))


def assert_close(name, got, ref):
  got, ref = np.asarray(got), np.asarray(ref)
  assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert err <= RTOL, f"{name}: max|diff| / max|ref| = {err:.2e} > {RTOL}"
  return err


def randomize(model, seed):
  """Random weights that make every branch matter: unit-gain conv/linear weights (timm's
  trunc_normal(0.02) leaves the modulation's gated product almost zero), and non-trivial
  norms, LayerScales and biases (timm inits them to 1, 1e-4 and 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
      elif name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def images(batch, size, seed=0):
  return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def tokens(x):
  """NCHW torch map -> (B, H*W, C) numpy tokens."""
  return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]).numpy()


def _forward(module, variables, x):
  return jax.jit(functools.partial(module.apply, return_blocks=True))(variables, x)


# ------------------------------------------------------------------ SEEM reference


def seem_reference(seed=0):
  torch.manual_seed(seed)
  return randomize(torch_reference.seem_focalt_net(), seed)


def seem_reference_forward(model, x):
  """SEEM's res2..res5: every stage's output after its LayerNorm (NCHW)."""
  with torch.no_grad():
    x = model.stem(x)
    outs = []
    for s, stage in enumerate(model.layers):
      x = stage(x)
      outs.append((model.stage_norms[s] if s < 3 else model.norm)(x))
  return outs


def seem_state_dict(model):
  """The reference's weights under SEEM's names (`backbone.` + focal_dw naming)."""
  out = {}
  for k, v in model.state_dict().items():
    k = re.sub(r"^stem\.", "patch_embed.", k)
    k = re.sub(r"^layers\.(\d)\.downsample", lambda g: f"layers.{int(g[1]) - 1}.downsample", k)
    k = re.sub(r"ls(\d)\.gamma$", r"gamma_\1", k)
    k = k.replace("norm1_post", "norm1").replace("norm2_post", "norm2")
    k = re.sub(r"^stage_norms\.(\d)\.", r"norm\1.", k)
    k = re.sub(r"^norm\.", "norm3.", k)
    if re.search(r"(modulation\.(f|proj)|mlp\.fc[12])\.weight$", k):
      v = v[:, :, 0, 0]  # Linear in SEEM, 1x1 conv in timm
    out["backbone." + k] = v.clone()
  return out


def seem_expected_shapes():
  """SEEM's 300 backbone keys and shapes (reference file, Appendix A)."""
  shapes = {"patch_embed.proj.weight": (96, 3, 7, 7), "patch_embed.proj.bias": (96,),
            "patch_embed.norm.weight": (96,), "patch_embed.norm.bias": (96,)}
  for s, (c, depth) in enumerate(zip(SEEM_DIMS, SEEM_DEPTHS)):
    for b in range(depth):
      p = f"layers.{s}.blocks.{b}."
      shapes.update({
          p + "gamma_1": (c,), p + "gamma_2": (c,),
          p + "dw1.weight": (c, 1, 3, 3), p + "dw1.bias": (c,),
          p + "norm1.weight": (c,), p + "norm1.bias": (c,),
          p + "modulation.f.weight": (2 * c + 4, c), p + "modulation.f.bias": (2 * c + 4,),
          p + "modulation.h.weight": (c, c, 1, 1), p + "modulation.h.bias": (c,),
          p + "modulation.proj.weight": (c, c), p + "modulation.proj.bias": (c,),
          p + "modulation.focal_layers.0.0.weight": (c, 1, 3, 3),
          p + "modulation.focal_layers.1.0.weight": (c, 1, 5, 5),
          p + "modulation.focal_layers.2.0.weight": (c, 1, 7, 7),
          p + "dw2.weight": (c, 1, 3, 3), p + "dw2.bias": (c,),
          p + "norm2.weight": (c,), p + "norm2.bias": (c,),
          p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
          p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
    if s < 3:
      p = f"layers.{s}.downsample."
      shapes.update({p + "proj.weight": (2 * c, c, 3, 3), p + "proj.bias": (2 * c,),
                     p + "norm.weight": (2 * c,), p + "norm.bias": (2 * c,)})
    shapes.update({f"norm{s}.weight": (c,), f"norm{s}.bias": (c,)})
  return {"backbone." + k: v for k, v in shapes.items()}


# Keys of the rest of SEEM that the converter must ignore explicitly.
SEEM_OTHER_KEYS = {
    "sem_seg_head.pixel_decoder.adapter_1.weight": (512, 96, 1, 1),
    "sem_seg_head.predictor.query_feat.weight": (101, 512),
    "sem_seg_head.predictor.lang_encoder.lang_encoder.token_embedding.weight": (49408, 8),
    "criterion.empty_weight": (134,),
}


@pytest.fixture(scope="module")
def seem_ref():
  return seem_reference()


@pytest.fixture(scope="module")
def seem_file(seem_ref, module_tmp):
  """A SEEM checkpoint as the release stores it: one flat state dict of the whole model."""
  state = seem_state_dict(seem_ref)
  state.update({k: torch.randn(shape) for k, shape in SEEM_OTHER_KEYS.items()})
  path = str(module_tmp.mktemp("seem") / "seem_focalt_v0.pt")
  torch.save(state, path)
  return path


@pytest.fixture(scope="module")
def seem_converted(seem_file, module_tmp):
  out = str(module_tmp.mktemp("seem_out") / "seem_focalt")
  assert convert_main(["seem", "--checkpoint", seem_file, "--out", out]) == 0
  return models.load(out)


def test_seem_reference_is_saved_under_seems_300_keys(seem_ref):
  state = seem_state_dict(seem_ref)
  assert {k: tuple(v.shape) for k, v in state.items()} == seem_expected_shapes()
  assert len(state) == 300
  assert sum(v.numel() for v in state.values()) == 29_922_288


def test_seem_model_matches_seem_parameter_count():
  variables = models.abstract_variables(models.create("seem_focalt"))
  assert sum(x.size for x in jax.tree_util.tree_leaves(variables)) == 29_922_288


@pytest.mark.parametrize("batch,size", [(2, (224, 224)), (1, (250, 190))])
def test_seem_parity(seem_ref, seem_converted, batch, size):
  module, variables = seem_converted
  assert models.family_of("seem_focalt") == "focalnet" and module.stage_norms
  x = images(batch, size)
  ref = seem_reference_forward(seem_ref, x)
  out = _forward(module, variables, nhwc(x))
  assert len(out["blocks"]) == 4
  for s, (got, want) in enumerate(zip(out["blocks"], ref)):
    assert_close(f"res{s + 2}", got, tokens(want))
  assert_close("tokens", out["tokens"], tokens(ref[-1]))
  assert_close("pooled", out["pooled"], ref[-1].mean(dim=(2, 3)).numpy())
  assert out["pooled"].shape == (batch, 768)
  assert module.token_grid(size) == tuple(ref[-1].shape[2:])


def test_seem_checkpoint_nested_under_model_converts_the_same(seem_file, seem_converted):
  raw = torch.load(seem_file, weights_only=True)
  args = types.SimpleNamespace(checkpoint="wrapped.pt", model=None)
  # The paper's `*_processed.pt`: the backbone alone, its focal_dw names without the `backbone.` prefix.
  bare = {k[len(seem.SEEM_PREFIX):]: v for k, v in raw.items() if k.startswith(seem.SEEM_PREFIX)}
  for wrapped in ({"model": raw, "epoch": 3}, bare):
    name, overrides, variables = seem.from_checkpoint(wrapped, None, "original", args)
    assert (name, overrides) == ("seem_focalt", {})
    flat = jax.tree_util.tree_leaves_with_path(seem_converted[1])
    nested = dict(jax.tree_util.tree_leaves_with_path(variables))
    assert len(flat) == len(nested) == 300
    for path, leaf in flat:
      np.testing.assert_array_equal(np.asarray(leaf), nested[path])


def test_seem_num_stages_cuts_after_a_stage(seem_converted):
  """Decapitation: `num_stages=k` gives SEEM's res{k+1} as pooled/tokens, with the full params."""
  module, variables = seem_converted
  x = nhwc(images(1, (64, 96)))
  full = _forward(module, variables, x)
  cut = models.create("seem_focalt", num_stages=2)
  needed = flatten_dict(models.abstract_variables(cut))
  assert set(needed) < set(flatten_dict(variables))
  params = unflatten_dict({k: v for k, v in flatten_dict(variables).items() if k in needed})
  out = _forward(cut, params, x)
  assert len(out["blocks"]) == 2 and out["pooled"].shape == (1, 192)
  assert_close("cut tokens", out["tokens"], full["blocks"][1])
  assert_close("cut pooled", out["pooled"], np.asarray(full["blocks"][1]).mean(axis=1))


@pytest.mark.parametrize("size", [(97, 130), (64, 33), (161, 95)])
def test_seem_token_grid_follows_seems_padding(seem_ref, size):
  """SEEM pads to a multiple of 4 (stem) and 2 (downsamples): ceil(H/4), then ceil halvings."""
  module = models.create("seem_focalt")
  with torch.no_grad():
    ref = seem_reference_forward(seem_ref, torch.zeros(1, 3, *size))
  grids = [tuple(r.shape[2:]) for r in ref]
  assert module.stage_grids(size) == grids
  assert grids[0] == tuple(-(-n // 4) for n in size)
  shapes = jax.eval_shape(functools.partial(module.apply, return_blocks=True),
                          models.abstract_variables(module),
                          jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))
  assert [b.shape[1] for b in shapes["blocks"]] == [h * w for h, w in grids]


# -------------------------------------------------------------------- timm family


def test_timm_registry_matches_timm_constructors():
  """Every registered timm FocalNet is built with timm's flags, and is found from its keys."""
  for name in TIMM_NAMES:
    ref = create_model(name, pretrained=False, num_classes=0, device="meta")
    m = models.create(name)
    block = ref.layers[0].blocks[0]
    assert m.embed_dim == ref.embed_dim[0] and m.depths == tuple(len(s.blocks) for s in ref.layers), name
    assert m.focal_levels == tuple(s.blocks[0].modulation.focal_level for s in ref.layers), name
    assert m.focal_windows == tuple(s.blocks[0].modulation.focal_window for s in ref.layers), name
    stem, down = ref.stem.proj, ref.layers[1].downsample.proj
    assert m.stem_conv == (stem.kernel_size[0], stem.stride[0], stem.padding[0]), name
    assert m.down_conv == (down.kernel_size[0], down.stride[0], down.padding[0]), name
    assert m.norm_placement == ("post" if block.use_post_norm else "pre"), name
    assert m.layerscale == (not isinstance(block.ls1, torch.nn.Identity)), name
    assert m.post_norm_in_modulation == block.modulation.use_post_norm, name
    assert m.normalize_modulator == block.modulation.normalize_modulator, name
    shapes = {k: types.SimpleNamespace(shape=tuple(v.shape)) for k, v in ref.state_dict().items()}
    assert seem.detect_timm_model(shapes, name) == name


@pytest.fixture(scope="module")
def timm_tiny():
  torch.manual_seed(1)
  return randomize(create_model("focalnet_tiny_srf", pretrained=False), seed=1)


def test_timm_focalnet_tiny_parity_from_hf_folder(timm_tiny, tmp_path):
  """A timm Hugging Face folder (config.json + model.safetensors), classifier head included."""
  folder = tmp_path / "focalnet_tiny_srf.ms_in1k"
  folder.mkdir()
  save_file({k: v.contiguous() for k, v in timm_tiny.state_dict().items()},
            str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({"architecture": "focalnet_tiny_srf",
                                                  "num_classes": 1000}))
  out = str(tmp_path / "out")
  assert convert_main(["seem", "--checkpoint", str(folder), "--out", out]) == 0
  module, variables = models.load(out)
  assert models.read_model_json(out)["name"] == "focalnet_tiny_srf"
  size = (250, 190)  # not a multiple of 32: timm's strided convs floor where SEEM's pad
  x = images(1, size, seed=2)
  with torch.no_grad():
    final, stages = timm_tiny.forward_intermediates(x, norm=True)
    pooled = timm_tiny.forward_head(final, pre_logits=True).numpy()
  got = _forward(module, variables, nhwc(x))
  for s, (g, want) in enumerate(zip(got["blocks"], stages)):
    assert_close(f"stage {s}", g, tokens(want))
  assert_close("tokens", got["tokens"], tokens(final))
  assert_close("pooled", got["pooled"], pooled)
  assert module.token_grid(size) == tuple(final.shape[2:]) == (7, 5)


# timm's large/huge/lrf flag sets (as timm registers them) at a reduced size: overlapped convs
# (stem padding 2), post-norm inside the branch, LayerScale, focal window 5, 4 levels, LayerNorm
# inside the modulation.
SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1))
TIMM_FLAGS = {
    "focalnet_large_fl3": dict(focal_levels=[3] * 4, focal_windows=[5] * 4, use_post_norm=True,
                               use_overlap_down=True, layerscale_value=1e-4),
    "focalnet_huge_fl4": dict(focal_levels=[4] * 4, use_post_norm=True,
                              use_post_norm_in_modulation=True, use_overlap_down=True,
                              layerscale_value=1e-4),
    "focalnet_base_lrf": dict(focal_levels=[3] * 4),
}


@pytest.mark.parametrize("name", sorted(TIMM_FLAGS))
def test_timm_focalnet_flags_parity(name, tmp_path):
  torch.manual_seed(3)
  ref = randomize(FocalNet(num_classes=0, **SMALL, **TIMM_FLAGS[name]), seed=3)
  path = str(tmp_path / "small.pth")
  torch.save(ref.state_dict(), path)
  state = core.flatten_state_dict(core.read_file(path))
  assert seem.timm_architecture(state)["norm_placement"] == models.create(name).norm_placement
  variables = seem.convert(state, model=name, layout="timm", source=path, overrides=SMALL)
  module = models.create(name, **SMALL)
  x = images(2, (96, 160), seed=4)
  with torch.no_grad():
    final, stages = ref.forward_intermediates(x, norm=True)
  got = _forward(module, variables, nhwc(x))
  for s, (g, want) in enumerate(zip(got["blocks"], stages)):
    assert_close(f"{name} stage {s}", g, tokens(want))
  assert_close(f"{name} tokens", got["tokens"], tokens(final))
  assert_close(f"{name} pooled", got["pooled"], final.mean(dim=(2, 3)).numpy())


# ---------------------------------------------------------------------- refusals


def test_seem_converter_refuses_a_wrong_checkpoint_listing_every_problem(seem_ref, tmp_path, capsys):
  state = seem_state_dict(seem_ref)
  del state["backbone.layers.2.blocks.5.dw2.weight"]
  state["backbone.norm1.weight"] = torch.zeros(96)
  state["backbone.layers.0.blocks.0.modulation.ln.weight"] = torch.zeros(96)
  state["sem_seg_head.predictor.class_embed"] = torch.zeros(512, 512)  # ignored, not reported
  path = str(tmp_path / "bad.pt")
  torch.save(state, path)
  out = tmp_path / "out"
  assert convert_main(["seem", "--checkpoint", path, "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "missing in" in err and "backbone.layers.2.blocks.5.dw2.weight" in err
  assert "unexpected keys" in err and "backbone.layers.0.blocks.0.modulation.ln.weight" in err
  assert "mis-shaped" in err and "backbone.norm1.weight" in err and "(96,)" in err
  assert "sem_seg_head" not in err
  assert not out.exists() and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_seem_converter_refuses_other_checkpoints(tmp_path, capsys):
  path = str(tmp_path / "resnet.pth")
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
  assert convert_main(["seem", "--checkpoint", path, "--out", str(tmp_path / "a")]) == 1
  assert "neither a SEEM checkpoint" in capsys.readouterr().err
  tiny = create_model("focalnet_tiny_srf", pretrained=False, device="meta")
  state = {k: np.zeros(v.shape, np.float32) for k, v in tiny.state_dict().items()}
  with pytest.raises(core.ConversionError, match="depthwise residual"):
    seem.convert(state, model="seem_focalt", layout="timm")
  with pytest.raises(core.ConversionError) as info:
    seem.convert(state, model="focalnet_tiny_lrf", layout="timm")
  assert "focal_layers.2.0.weight" in str(info.value) and "mis-shaped" in str(info.value)
  assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_depthwise_conv_and_its_gradients_equal_a_grouped_convolution(kernel_size):
  """The shifted-products depthwise conv and its hand-written VJP against XLA's grouped conv."""
  channels = 6
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, channels))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, channels))
  cotangent = jax.random.normal(jax.random.key(2), x.shape)

  def grouped(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel[:, :, None, :], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=channels,
                                        precision=jax.lax.Precision.HIGHEST)

  def output_and_gradients(fn):
    out, vjp = jax.vjp(fn, x, kernel)
    return (out, *vjp(cotangent))

  with jax.default_matmul_precision("highest"):
    got, ref = output_and_gradients(focalnet.depthwise_conv), output_and_gradients(grouped)
  for label, a, b in zip(("output", "input gradient", "kernel gradient"), got, ref):
    assert_close(label, a, b)


def test_depthwise_conv_refuses_an_even_kernel():
  with pytest.raises(ValueError, match="kernel_size 4"):
    focalnet.DepthwiseConv(4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
