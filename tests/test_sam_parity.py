"""SAM image encoder: parity with segment_anything and transformers, converters, table resampling.

References get random weights (every tensor, including the zero-initialized position tables)
and are compared at fp32 with max |delta| <= 1e-4 * max |ref| on pooled, tokens, every block and
the neck: at the native 1024 (one image: the CPU-heavy test), and at 224 where the references
are built for 224 and loaded with weights resampled as the paper's `filter_interpolate_weights`
does it, while the Flax model resamples its native tables at call time.
"""
import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT
from transformers import SamConfig, SamModel, SamVisionConfig, SamVisionModel

from convert import __main__ as convert_cli
from convert import core
from convert import sam as convert_sam
from mfjax import models
from mfjax.models import posemb
from tests.parity import assert_outputs_match

VITB_GLOBAL_BLOCKS = (2, 5, 8, 11)


class _Args:
  """The parsed `python -m convert sam` options that from_checkpoint reads."""
  rel_pos_resize = "nearest"
  checkpoint = "test checkpoint"


def randomize(module: torch.nn.Module, seed: int) -> None:
  """Random values of a sensible scale in every parameter (tables and norms included)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.randn(p.shape, generator=gen)
      if name.endswith("pos_embed") or "rel_pos" in name:
        p.copy_(0.5 * r)
      elif p.ndim == 1:  # norm scales (the only 1-D weights) and biases
        p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.1 * r)
      else:
        p.copy_(r / np.sqrt(p[0].numel()))


def sa_encoder(img_size: int, embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)):
  """segment_anything's ImageEncoderViT exactly as build_sam configures it, at `img_size`."""
  return ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
                         use_rel_pos=True, global_attn_indexes=global_attn_indexes, window_size=14,
                         out_chans=256).eval()


def hf_vision_config(img_size: int, embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)):
  return SamVisionConfig(hidden_size=embed_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
                         global_attn_indexes=list(global_attn_indexes), image_size=img_size)


def hf_key(sa_key: str) -> str:
  """segment_anything encoder key -> transformers SamVisionEncoder key."""
  for old, new in (("patch_embed.proj.", "patch_embed.projection."), ("blocks.", "layers."),
                   (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), ("neck.0.", "neck.conv1."),
                   ("neck.1.", "neck.layer_norm1."), ("neck.2.", "neck.conv2."), ("neck.3.", "neck.layer_norm2.")):
    sa_key = sa_key.replace(old, new)
  return sa_key


def paper_resample(encoder_state: dict, img_size: int, global_blocks) -> dict:
  """The paper's load-time resize (torch): bicubic+antialias pos_embed, 'nearest' global rel-pos tables."""
  grid = img_size // 16
  out = dict(encoder_state)
  for key, value in encoder_state.items():
    if "rel_pos" in key and int(key.split(".")[1]) in global_blocks:
      out[key] = F.interpolate(value[None].permute(0, 2, 1), size=2 * grid - 1).permute(0, 2, 1)[0]
  pos = encoder_state["pos_embed"].permute(0, 3, 1, 2)
  out["pos_embed"] = F.interpolate(pos, size=grid, mode="bicubic", antialias=True).permute(0, 2, 3, 1)
  return out


def run_torch(encoder, blocks, images: np.ndarray, neck_fn) -> dict:
  """Every block's output (B, H*W, D) and the neck (NHWC) of a torch encoder, via forward hooks."""
  outs = []
  hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().numpy())) for b in blocks]
  try:
    with torch.no_grad():
      neck = neck_fn(encoder(torch.from_numpy(images).permute(0, 3, 1, 2)))
  finally:
    for h in hooks:
      h.remove()
  last = outs[-1]
  return {"pooled": last.mean(axis=(1, 2)), "tokens": last.reshape(last.shape[0], -1, last.shape[-1]),
          "blocks": [o.reshape(o.shape[0], -1, o.shape[-1]) for o in outs],
          "neck": neck.permute(0, 2, 3, 1).numpy()}


def run_sa(encoder, images):
  return run_torch(encoder, encoder.blocks, images, lambda y: y)


def run_hf(model: SamVisionModel, images):
  return run_torch(model, model.vision_encoder.layers, images, lambda y: y.last_hidden_state)


def images(shape, seed):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def flax_apply(module, jit=False):
  """module.apply with every output; unjitted by default (at 224 a single eager call beats compiling)."""
  apply = functools.partial(module.apply, return_blocks=True, return_neck=True)
  return jax.jit(apply) if jit else apply


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def released_b():
  """A SAM ViT-B with random weights, laid out as sam_vit_b_01ec64.pth (encoder, prompt encoder, decoder)."""
  torch.manual_seed(0)
  sam = sam_model_registry["vit_b"]()
  randomize(sam.image_encoder, seed=1)
  return sam


@pytest.fixture(scope="module")
def encoder_state(released_b):
  return {k: v.detach().clone() for k, v in released_b.image_encoder.state_dict().items()}


@pytest.fixture(scope="module")
def converted_b(released_b, module_tmp):
  """The released-format file through `python -m convert sam`, loaded back with models.load."""
  folder = module_tmp.mktemp("sam")
  ckpt = folder / "sam_vit_b_random.pth"
  torch.save(released_b.state_dict(), ckpt)
  out = folder / "flax"
  assert convert_cli.main(["sam", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
  ckpt.unlink()
  module, variables = models.load(str(out))
  assert models.read_model_json(str(out))["name"] == "sam_vitb"
  return module, variables


@pytest.fixture(scope="module")
def hf_folder(encoder_state, module_tmp):
  """A transformers SamModel (vision encoder = the same weights) saved with save_pretrained."""
  torch.manual_seed(2)
  model = SamModel(SamConfig(vision_config=hf_vision_config(1024).to_dict())).eval()
  model.vision_encoder.load_state_dict({hf_key(k): v for k, v in encoder_state.items()}, strict=True)
  folder = module_tmp.mktemp("sam_hf") / "sam-vit-base"
  model.save_pretrained(folder)
  return folder


# ------------------------------------------------------------------------- parity tests


@pytest.fixture(scope="module")
def outputs_1024(converted_b):
  module, variables = converted_b
  x = images((1, 1024, 1024, 3), seed=3)
  return x, flax_apply(module, jit=True)(variables, x)


def test_vitb_1024_matches_segment_anything(released_b, outputs_1024):
  x, got = outputs_1024
  assert got["tokens"].shape == (1, 64 * 64, 768) and got["neck"].shape == (1, 64, 64, 256)
  assert_outputs_match(got, run_sa(released_b.image_encoder, x), "sam_vitb 1024 vs segment_anything")


def test_vitb_1024_matches_transformers(encoder_state, outputs_1024):
  x, got = outputs_1024
  hf = SamVisionModel(hf_vision_config(1024)).eval()
  hf.vision_encoder.load_state_dict({hf_key(k): v for k, v in encoder_state.items()}, strict=True)
  assert_outputs_match(got, run_hf(hf, x), "sam_vitb 1024 vs transformers")


def test_hf_folder_converts_to_the_same_parameters(hf_folder, converted_b):
  raw, config, _ = core.read_checkpoint(str(hf_folder))
  name, overrides, variables = convert_sam.from_checkpoint(raw, config, "hf", _Args())
  assert (name, overrides) == ("sam_vitb", {})
  want = converted_b[1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, jax.tree_util.tree_map(np.asarray, want))


def test_vitb_224_matches_references_with_the_papers_resampling(encoder_state, converted_b):
  """Flax resamples at call time; the references are built at 224 with the paper's resampled weights."""
  module, variables = converted_b
  resampled = paper_resample(encoder_state, 224, VITB_GLOBAL_BLOCKS)
  sa = sa_encoder(224)
  sa.load_state_dict(resampled, strict=True)
  hf = SamVisionModel(hf_vision_config(224)).eval()
  hf.vision_encoder.load_state_dict({hf_key(k): v for k, v in resampled.items()}, strict=True)
  x = images((1, 224, 224, 3), seed=4)
  got = flax_apply(module)(variables, x)
  assert got["tokens"].shape == (1, 14 * 14, 768)
  assert_outputs_match(got, run_sa(sa, x), "sam_vitb 224 (nearest) vs segment_anything")
  assert_outputs_match(got, run_hf(hf, x), "sam_vitb 224 (nearest) vs transformers")
  # At 384 the 24 x 24 grid pads its windows to 28: the resampled global tables with padded windows.
  sa = sa_encoder(384)
  sa.load_state_dict(paper_resample(encoder_state, 384, VITB_GLOBAL_BLOCKS), strict=True)
  x = images((1, 384, 384, 3), seed=6)
  assert_outputs_match(flax_apply(module, jit=True)(variables, x), run_sa(sa, x),
                       "sam_vitb 384 (nearest, padded windows) vs segment_anything")


def test_linear_rel_pos_matches_segment_anythings_runtime_interpolation(encoder_state, converted_b):
  """rel_pos_resize='linear': the native tables, interpolated by get_rel_pos in the forward pass.

  At 224 x 320 (a 14 x 20 grid): unequal axes, and windows padded from 20 to 28 columns.
  """
  _, variables = converted_b
  size = (224, 320)
  module = models.create("sam_vitb", rel_pos_resize="linear")
  grid = (size[0] // 16, size[1] // 16)
  sa = sa_encoder(1024)
  sa.load_state_dict(encoder_state, strict=True)
  pos = encoder_state["pos_embed"].permute(0, 3, 1, 2)
  sa.pos_embed = torch.nn.Parameter(F.interpolate(pos, size=grid, mode="bicubic", antialias=True).permute(0, 2, 3, 1))
  x = images((1, *size, 3), seed=5)
  got = flax_apply(module)(variables, x)
  assert got["tokens"].shape == (1, grid[0] * grid[1], 768)
  reference = run_sa(sa, x)
  assert_outputs_match(got, reference, f"sam_vitb {size} (linear) vs segment_anything")
  # The GPU's attention path (jax.nn.dot_product_attention with the decomposed bias), here on the CPU.
  xla = flax_apply(models.create("sam_vitb", rel_pos_resize="linear", attn_impl="xla"))(variables, x)
  assert_outputs_match(xla, reference, f"sam_vitb {size} (linear, attn_impl=xla) vs segment_anything")
  nearest = flax_apply(models.create("sam_vitb"))(variables, x)
  assert np.abs(np.asarray(nearest["pooled"]) - np.asarray(got["pooled"])).max() > 1e-3  # the modes differ


@pytest.mark.parametrize("name,size", [("sam_vitl", "vit_l"), ("sam_vith", "vit_h")])
def test_vitl_vith_shapes_match_segment_anything(name, size, monkeypatch):
  """Full-size conversion on shapes only: segment_anything's builder on the meta device, no weights."""
  with torch.device("meta"):
    sam = sam_model_registry[size]()
  zero = np.zeros((), np.int8)
  state = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in sam.state_dict().items()}
  monkeypatch.setattr(core, "linear", lambda w: w.T)
  monkeypatch.setattr(core, "conv", lambda w: w.transpose(2, 3, 1, 0))
  name_got, overrides, variables = convert_sam.from_checkpoint(state, None, "original", _Args())
  assert (name_got, overrides) == (name, {})
  module = models.create(name)
  n_flax = sum(v.size for v in jax.tree_util.tree_leaves(models.abstract_variables(module)))
  n_torch = sum(v.numel() for k, v in sam.state_dict().items() if k.startswith("image_encoder."))
  assert n_flax == n_torch
  assert {len(variables["params"][f"blocks_{i}"]["attn"]["rel_pos_h"]) for i in module.global_blocks} == {127}


@pytest.mark.parametrize("name,width,heads", [("sam_vitl", 1024, 16), ("sam_vith", 1280, 16)])
def test_vitl_vith_reduced_depth_parity(name, width, heads):
  """Full width and heads, two blocks (windowed + global), native 224: a cheap numerical check."""
  sa = sa_encoder(224, embed_dim=width, depth=2, num_heads=heads, global_attn_indexes=(1,))
  randomize(sa, seed=6)
  state = {"image_encoder." + k: v.numpy() for k, v in sa.state_dict().items()}
  variables = convert_sam.convert(state, "original", name, depth=2, global_blocks=(1,), native_resolution=(224, 224))
  module = models.create(name, depth=2, global_blocks=(1,), native_resolution=(224, 224))
  x = images((1, 224, 224, 3), seed=7)
  assert_outputs_match(flax_apply(module)(variables, x), run_sa(sa, x), f"{name} depth 2 vs segment_anything")


# ------------------------------------------------------------------ converter refusals


def _corrupt(state: dict, prefix: str, block: str) -> dict:
  bad = dict(state)
  del bad[f"{prefix}{block}4.attn.rel_pos_w"]
  bad[f"{prefix}{block}4.attn.rel_pos_extra"] = bad[f"{prefix}{block}4.attn.rel_pos_h"][:3]
  lin1 = "mlp.lin1.weight"
  bad[f"{prefix}{block}7.{lin1}"] = bad[f"{prefix}{block}7.{lin1}"][:100]
  return bad


def test_converter_refuses_a_wrong_released_checkpoint_and_writes_nothing(released_b, tmp_path, capsys):
  state = {k: v.detach() for k, v in released_b.state_dict().items()}
  ckpt = tmp_path / "broken.pth"
  torch.save(_corrupt(state, "image_encoder.", "blocks."), ckpt)
  out = tmp_path / "out"
  assert convert_cli.main(["sam", "--checkpoint", str(ckpt), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  for text in ("missing", "image_encoder.blocks.4.attn.rel_pos_w", "unexpected",
               "image_encoder.blocks.4.attn.rel_pos_extra", "mis-shaped", "image_encoder.blocks.7.mlp.lin1.weight"):
    assert text in err, f"{text!r} not in the error:\n{err}"
  assert err.count("error:") == 1
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


def test_converter_refuses_a_wrong_hf_checkpoint(hf_folder):
  raw, config, _ = core.read_checkpoint(str(hf_folder))
  with pytest.raises(core.ConversionError) as info:
    convert_sam.from_checkpoint(_corrupt(raw, "vision_encoder.", "layers."), config, "hf", _Args())
  message = str(info.value)
  for text in ("vision_encoder.layers.4.attn.rel_pos_w", "vision_encoder.layers.4.attn.rel_pos_extra",
               "vision_encoder.layers.7.mlp.lin1.weight"):
    assert text in message
  assert "prompt_encoder" not in message and "mask_decoder" not in message  # ignored explicitly


def test_converter_refuses_a_non_sam_file(tmp_path, capsys):
  ckpt = tmp_path / "other.pth"
  torch.save({"model.fc.weight": torch.zeros(2, 2)}, ckpt)
  assert convert_cli.main(["sam", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 1
  assert "no SAM image encoder found" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- rel-pos table kernels


@pytest.mark.parametrize("old,new", [(127, 27), (127, 39), (27, 127), (63, 27), (27, 27)])
def test_rel_pos_resampling_matches_torch(old, new):
  table = torch.randn(old, 64, generator=torch.Generator().manual_seed(old + new))
  as_signal = table[None].permute(0, 2, 1)
  nearest = F.interpolate(as_signal, size=new).permute(0, 2, 1)[0].numpy()
  linear = F.interpolate(as_signal, size=new, mode="linear").permute(0, 2, 1)[0].numpy()
  np.testing.assert_array_equal(np.asarray(posemb.resample_rel_pos_nearest(table.numpy(), new)), nearest)
  np.testing.assert_allclose(np.asarray(posemb.resample_rel_pos_linear(table.numpy(), new)), linear,
                             rtol=0, atol=1e-6)


def test_registry_and_options():
  assert {"sam_vitb", "sam_vitl", "sam_vith"} <= set(models.NAMES)
  module = models.create("sam_vitb")
  assert models.native_resolution(module) == (1024, 1024)
  assert module.token_grid((224, 320)) == (14, 20)
  with pytest.raises(ValueError, match="rel_pos_resize"):
    bad = models.create("sam_vitb", rel_pos_resize="bicubic", depth=1, native_resolution=(224, 224))
    bad.init(jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
  with pytest.raises(ValueError, match="multiple of the patch size"):
    small = models.create("sam_vitb", depth=1, native_resolution=(224, 224))
    small.init(jax.random.PRNGKey(0), np.zeros((1, 100, 100, 3), np.float32))


def test_the_papers_processed_checkpoint_converts_with_no_neck(encoder_state, converted_b, tmp_path, capsys):
  """filter_interpolate_weights' file: image_encoder keys only, no neck, pos_embed and the global
  blocks' tables already resized to 224 px; saved wrapped under 'model' as fine-tunes often are."""
  state = {}
  for k, v in encoder_state.items():
    if k.startswith("neck."):
      continue
    if k == "pos_embed":
      v = F.interpolate(v.permute(0, 3, 1, 2), size=(14, 14), mode="bicubic", antialias=True,
                        align_corners=False).permute(0, 2, 3, 1)
    elif "rel_pos" in k and int(k.split(".")[1]) in VITB_GLOBAL_BLOCKS:
      v = F.interpolate(v.T[None], size=27)[0].T  # the default mode, nearest
    state["image_encoder." + k] = v
  ckpt = tmp_path / "sam_processed.pth"
  torch.save({"model": state}, ckpt)
  assert convert_cli.main(["sam", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 1
  assert "pass --no-neck" in capsys.readouterr().err
  assert convert_cli.main(["sam", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-neck"]) == 0
  module, variables = models.load(str(tmp_path / "out"))
  assert module.native_resolution == (224, 224)
  assert all(not np.any(v) for v in jax.tree_util.tree_leaves(variables["params"]["neck"]))
  x = images((1, 224, 224, 3), seed=5)
  ours, resampled_per_call = flax_apply(module)(variables, x), flax_apply(converted_b[0])(converted_b[1], x)
  for key in ("pooled", "tokens"):
    np.testing.assert_allclose(ours[key], resampled_per_call[key], rtol=1e-5, atol=1e-5 * np.abs(ours[key]).max())
