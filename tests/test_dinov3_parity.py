"""DINOv3 and MedDINOv3: parity with timm and transformers, converters, RoPE, masked key bias.

Checkpoints are random and written in each original layout: the official flat state dict
(through timm's own loader for the reference), a transformers `save_pretrained` folder, and a
MedDINOv3 training checkpoint ({'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}).
Parity: fp32, max |delta| <= 1e-4 * max |ref| on pooled, tokens and every block, at 224 and 512.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from convert import __main__ as convert_cli
from convert import core
from convert import dinov3 as convert_dinov3
from mfjax import models
from mfjax.models import dinov3, layers
from benchmarks.nnunet_reference import official_state, timm_reference
from tests.parity import assert_outputs_match

SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}


def randomize(module: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2 and "token" not in name:
        p.copy_(r / np.sqrt(p[0].numel()))
      elif "lambda" in name:
        p.copy_(0.3 * r)
      elif name.endswith("weight") and "norm" in name:
        p.copy_(1 + 0.2 * r)
      else:
        p.copy_(r if "token" in name else 0.1 * r)


def run_torch(forward, blocks, images: np.ndarray, prefix: int = 5) -> dict:
  """pooled, tokens and every block output of a torch DINOv3 via forward hooks; forward returns normed x."""
  outs = []
  hooks = [b.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).numpy()))
           for b in blocks]
  try:
    with torch.no_grad():
      normed = forward(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  finally:
    for h in hooks:
      h.remove()
  return {"pooled": normed[:, 0], "tokens": normed[:, prefix:], "blocks": outs}


def run_timm(model, images):
  return run_torch(model.forward_features, model.blocks, images)


def run_hf(model, images, **kw):
  return run_torch(lambda x: model(pixel_values=x, **kw).last_hidden_state, model.model.layer, images)


def images(shape, seed):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def apply_all(module, variables, x, **kw):
  return module.apply(variables, x, return_blocks=True, **kw)


class _Args:
  """The parsed `python -m convert dinov3` options that from_checkpoint reads."""
  ln_eps = None
  checkpoint = "test checkpoint"
  rope_dtype = "float32"


def convert_file(tmp_path, obj, *extra) -> tuple:
  """`python -m convert dinov3` on `obj` saved with torch.save; (module, variables, model.json)."""
  ckpt, out = tmp_path / "ckpt.pth", tmp_path / "flax"
  torch.save(obj, ckpt)
  assert convert_cli.main(["dinov3", "--checkpoint", str(ckpt), "--out", str(out), *extra]) == 0
  module, variables = models.load(str(out))
  return module, variables, models.read_model_json(str(out))


# ------------------------------------------------------------------------- parity tests


@pytest.fixture(scope="module")
def official_b():
  return official_state(*SIZES["b"], seed=0)


@pytest.fixture(scope="module")
def converted_official_b(official_b, module_tmp):
  return convert_file(module_tmp.mktemp("dinov3"), official_b)


@pytest.mark.parametrize("size", [224, 512])
def test_official_vitb16_matches_timm(official_b, converted_official_b, size):
  module, variables, meta = converted_official_b
  assert (meta["name"], meta["overrides"]) == ("dinov3_vitb16", {})
  reference = timm_reference("vit_base_patch16_dinov3_qkvb", official_b)
  x = images((1, size, size, 3), seed=size)
  got = (jax.jit(functools.partial(apply_all, module)) if size > 224 else functools.partial(apply_all, module))(
      variables, x)
  assert got["tokens"].shape == (1, (size // 16) ** 2, 768) and got["blocks"][0].shape[1] == 5 + (size // 16) ** 2
  assert_outputs_match(got, run_timm(reference, x), f"dinov3_vitb16 {size} vs timm")


@pytest.fixture(scope="module")
def hf_b(module_tmp):
  torch.manual_seed(1)
  config = DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           num_register_tokens=4, layer_norm_eps=1e-5, image_size=224)
  model = DINOv3ViTModel(config).eval()
  randomize(model, seed=2)
  folder = module_tmp.mktemp("dinov3_hf") / "dinov3-vitb16"
  model.save_pretrained(folder)
  out = folder.parent / "flax"
  assert convert_cli.main(["dinov3", "--checkpoint", str(folder), "--out", str(out)]) == 0
  return model, folder, models.load(str(out)), models.read_model_json(str(out))


@pytest.mark.parametrize("size", [224, 512])
def test_hf_vitb16_matches_transformers(hf_b, size):
  model, _, (module, variables), meta = hf_b
  assert (meta["name"], meta["overrides"]) == ("dinov3_vitb16", {})
  x = images((1, size, size, 3), seed=size + 1)
  got = (jax.jit(functools.partial(apply_all, module)) if size > 224 else functools.partial(apply_all, module))(
      variables, x)
  assert_outputs_match(got, run_hf(model, x), f"dinov3_vitb16 {size} vs transformers")


def test_meddinov3_checkpoint_matches_timm_without_qkv_bias(tmp_path):
  """MedDINOv3's training checkpoint: teacher backbone, no qkv bias, eps 1e-6, heads ignored."""
  backbone = official_state(*SIZES["b"], qkv_bias=False, seed=3)
  gen = torch.Generator().manual_seed(4)
  teacher = {"backbone." + k: v for k, v in backbone.items()}
  teacher.update({"dino_head.mlp.0.weight": torch.randn(2048, 768, generator=gen),
                  "dino_head.last_layer.weight": torch.randn(65536, 256, generator=gen)[:8],
                  "ibot_head.mlp.0.weight": torch.randn(2048, 768, generator=gen)})
  student = {"backbone.cls_token": torch.zeros(1, 1, 768)}
  module, variables, meta = convert_file(tmp_path, {"teacher": teacher, "student": student, "iteration": 7})
  assert (meta["name"], meta["overrides"]) == ("meddinov3_vitb16", {})
  assert module.ln_eps == 1e-6 and not module.qkv_bias and module.rope_rescale is None
  reference = timm_reference("vit_base_patch16_dinov3", backbone,
                             norm_layer=functools.partial(timm.layers.LayerNorm, eps=1e-6))
  x = images((1, 224, 224, 3), seed=5)
  assert_outputs_match(apply_all(module, variables, x), run_timm(reference, x), "meddinov3_vitb16 224 vs timm")


def test_meddinov3_segmentation_network_trained_by_nnunet_gives_its_backbone(tmp_path):
  """nnU-Net's checkpoint_final.pth of MedDINOv3's Primus_Multiscale (its log holds NumPy floats,
  which torch's weights-only loading refuses unless allowed): the backbone is read from
  `dino_encoder.*` (as the teacher's `backbone.*`), the decoder ignored; anything else is named."""
  backbone = official_state(*SIZES["b"], qkv_bias=False, seed=3)
  gen = torch.Generator().manual_seed(5)
  decoder = {"up_projection.decode.0.0.weight": torch.randn(3072, 1536, 2, 2, generator=gen),
             "up_projection.decode.0.1.weight": torch.ones(1536),
             "up_projection.decode.4.weight": torch.randn(5, 192, 1, 1, generator=gen)}
  network = {**{"dino_encoder." + k: v for k, v in backbone.items()}, **decoder}
  checkpoint = {"network_weights": network, "trainer_name": "meddinov3_base_primus_multiscale_Trainer",
                "current_epoch": 1000, "_best_ema": 0.85, "inference_allowed_mirroring_axes": (0, 1),
                "init_args": {"configuration": "2d", "fold": 0, "device": torch.device("cpu"),
                              "plans": {"configurations": {"2d": {"patch_size": [512, 512]}}}},
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 3e-5, "params": [0, 1]}]},
                "grad_scaler_state": None, "logging": {"ema_fg_dice": [np.float64(0.84), np.float64(0.85)]}}
  _, variables, meta = convert_file(tmp_path, checkpoint)   # torch.save'd, read back by the converter's CLI
  expected = convert_dinov3.from_checkpoint({"teacher": {"backbone." + k: v for k, v in backbone.items()}}, None,
                                            "original", _Args())
  assert (meta["name"], meta["overrides"]) == expected[:2] == ("meddinov3_vitb16", {})
  jax.tree.map(np.testing.assert_array_equal, variables, expected[2])
  network["input_adapter.weight"] = torch.eye(3)[..., None, None]   # a fork's extra layer: not silently dropped
  with pytest.raises(core.ConversionError, match="input_adapter.weight"):
    convert_dinov3.from_checkpoint(checkpoint, None, "original", _Args())


def test_a_network_without_storage_tokens_converts(tmp_path):
  """DINOv3's vit_base(n_storage_tokens=0) has no storage_tokens parameter: MedDINOv3's nnU-Net
  networks on the original DINOv3 backbone, the baseline it is compared with."""
  backbone = official_state(768, 12, 12, seed=9)
  del backbone["storage_tokens"]
  network = {"dino_encoder." + k: v for k, v in backbone.items()}
  network["up_projection.decode.4.weight"] = torch.zeros(5, 192, 1, 1)
  module, variables, meta = convert_file(tmp_path, {"network_weights": network})
  assert meta["overrides"]["num_storage"] == 0 and "storage_tokens" not in variables["params"]
  # timm recognises DINOv3 weights by their storage_tokens key: give it an empty one, then drop it.
  reference = timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, num_reg_tokens=0).eval()
  filtered = timm.models.eva.checkpoint_filter_fn(dict(backbone, storage_tokens=torch.zeros(1, 0, 768)), reference)
  assert tuple(filtered.pop("reg_token").shape) == (1, 0, 768)
  reference.load_state_dict(filtered, strict=True)
  x = images((1, 64, 96, 3), seed=10)
  assert_outputs_match(apply_all(module, variables, x), run_torch(reference.forward_features, reference.blocks, x,
                                                                  prefix=1), "dinov3 without storage tokens vs timm")


def test_vits16_full_and_vitl16_reduced_depth_match_timm():
  state = official_state(*SIZES["s"], seed=6)
  name, overrides, variables = convert_dinov3.from_checkpoint(state, None, "original", _Args())
  assert (name, overrides) == ("dinov3_vits16", {})
  x = images((1, 224, 224, 3), seed=7)
  assert_outputs_match(apply_all(models.create(name), variables, x),
                run_timm(timm_reference("vit_small_patch16_dinov3_qkvb", state), x), "dinov3_vits16 224 vs timm")

  width, _, heads = SIZES["l"]
  state = official_state(width, 2, heads, seed=8)
  variables = convert_dinov3.convert({k: core.to_numpy(v) for k, v in state.items()}, "original", "dinov3_vitl16",
                                     depth=2)
  reference = timm_reference("vit_large_patch16_dinov3_qkvb", state, depth=2)
  assert_outputs_match(apply_all(models.create("dinov3_vitl16", depth=2), variables, x), run_timm(reference, x),
                "dinov3_vitl16 depth 2 vs timm")


@pytest.mark.parametrize("size", ["s", "b", "l"])
def test_registered_shapes_match_timm(size):
  name = f"dinov3_vit{size}16"
  with torch.device("meta"):
    reference = timm.create_model(f"vit_{dict(s='small', b='base', l='large')[size]}_patch16_dinov3_qkvb")
  n_torch = sum(p.numel() for p in reference.parameters())
  width = SIZES[size][0]
  n_flax = sum(v.size for v in jax.tree_util.tree_leaves(models.abstract_variables(models.create(name))))
  # timm keeps no mask token and no key-bias parameter.
  assert n_flax == n_torch + width + width * SIZES[size][1]


def two_block_hf(registers: int, seed: int):
  """(model, its state dict as numpy) of a random two-block ViT-S-width transformers DINOv3."""
  torch.manual_seed(seed)
  config = DINOv3ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                           num_register_tokens=registers, pos_embed_rescale=None, layer_norm_eps=1e-6)
  model = DINOv3ViTModel(config).eval()
  randomize(model, seed=seed + 1)
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


def test_a_transformers_model_without_register_tokens_converts():
  """transformers' DINOv3ViTModel(num_register_tokens=0), its default, keeps an empty (1, 0, D)
  register_tokens tensor."""
  model, raw = two_block_hf(registers=0, seed=13)
  config = model.config
  assert raw["embeddings.register_tokens"].shape == (1, 0, 384)
  name, overrides, variables = convert_dinov3.from_checkpoint(raw, config.to_dict(), "hf", _Args())
  assert overrides["num_storage"] == 0 and "storage_tokens" not in variables["params"]
  x = images((1, 64, 96, 3), seed=15)
  want = run_torch(lambda x: model(pixel_values=x).last_hidden_state, model.model.layer, x, prefix=1)
  assert_outputs_match(apply_all(models.create(name, **overrides), variables, x), want,
                       "dinov3 without register tokens vs transformers")
  raw["embeddings.register_tokens"] = np.zeros((1, 2, 384), np.float32)  # the config says none
  with pytest.raises(core.ConversionError, match=r"embeddings.register_tokens \(1, 2, 384\).*num_register_tokens"):
    convert_dinov3.from_checkpoint(raw, config.to_dict(), "hf", _Args())


# ------------------------------------------------------------- masks, RoPE, key bias


@pytest.fixture(scope="module")
def small_hf():
  """A two-block ViT-S-width HF model: cheap, and read through HF-config overrides."""
  model, raw = two_block_hf(registers=4, seed=9)
  name, overrides, variables = convert_dinov3.from_checkpoint(raw, model.config.to_dict(), "hf", _Args())
  assert name == "dinov3_vits16"
  assert overrides == {"depth": 2, "ln_eps": 1e-6, "rope_rescale": None}
  return model, models.create(name, **overrides), variables


def test_masks_match_transformers_bool_masked_pos(small_hf):
  model, module, variables = small_hf
  x = images((2, 64, 96, 3), seed=11)
  masks = np.random.RandomState(12).rand(2, 4 * 6) < 0.4
  got = apply_all(module, variables, x, masks=jnp.asarray(masks))
  want = run_hf(model, x, bool_masked_pos=torch.from_numpy(masks))
  assert_outputs_match(got, want, "dinov3 masked tokens vs transformers")
  unmasked = apply_all(module, variables, x)
  assert np.abs(np.asarray(unmasked["pooled"]) - np.asarray(got["pooled"])).max() > 1e-3


def test_both_hf_block_prefixes_convert(small_hf):
  """Hub files say `layer.N`, transformers 5 state dicts `model.layer.N`: the same parameters."""
  model, _, variables = small_hf
  raw = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(k.startswith("model.layer.") for k in raw)
  hub = {k.removeprefix("model."): v for k, v in raw.items()}
  _, _, again = convert_dinov3.from_checkpoint(hub, model.config.to_dict(), "hf", _Args())
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


def test_key_bias_is_masked_in_the_forward_pass_and_gets_no_gradient():
  module = models.create("dinov3_vits16", depth=1)
  params = ones_layerscale(init(module))["params"]
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x)["tokens"])
  x = images((2, 32, 32, 3), seed=13)
  bias = params["blocks_0"]["attn"]["qkv"]["bias"]
  noise = jax.random.normal(jax.random.PRNGKey(1), bias.shape)
  with_bias = lambda b: {**params, "blocks_0": {**params["blocks_0"], "attn": {
      **params["blocks_0"]["attn"], "qkv": {**params["blocks_0"]["attn"]["qkv"], "bias": b}}}}
  base = apply(params, x)
  np.testing.assert_array_equal(apply(with_bias(bias.at[384:768].add(noise[384:768])), x), base)  # k: unused
  assert np.abs(apply(with_bias(bias + noise), x) - base).max() > 1e-2                          # q, v: used

  loss = lambda p: jnp.sum(module.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})[
      "tokens"] ** 2)
  grad = jax.jit(jax.grad(loss))(with_bias(bias + noise))["blocks_0"]["attn"]["qkv"]["bias"]
  assert np.all(np.asarray(grad[384:768]) == 0) and np.abs(np.asarray(grad[:384])).max() > 0
  unmasked = models.create("dinov3_vits16", depth=1, k_bias=True)
  assert np.abs(jax.jit(unmasked.apply)({"params": with_bias(bias.at[384:768].add(noise[384:768]))}, x)["tokens"]
                - base).max() > 1e-2


def init(module, size=(32, 32)):
  """Random variables (jitted init: one compile instead of one per eager op)."""
  return jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))


def ones_layerscale(variables):
  """LayerScale 1 instead of the 1e-5 init, so that the attention branch visibly counts."""
  return jax.tree_util.tree_map_with_path(lambda path, v: jnp.ones_like(v) if path[-1].key == "gamma" else v,
                                          variables)


def test_rope_augmentation_applies_only_in_training():
  module = models.create("dinov3_vits16", depth=1)  # rope_rescale=2 as released
  plain = models.create("dinov3_vits16", depth=1, rope_rescale=None)
  variables = ones_layerscale(init(module))
  x = images((1, 32, 48, 3), seed=14)
  run = lambda m, train, seed=None: np.asarray(jax.jit(functools.partial(m.apply, train=train))(
      variables, x, rngs=None if seed is None else {"dropout": jax.random.PRNGKey(seed)})["tokens"])
  evaluated = run(module, False)
  np.testing.assert_array_equal(evaluated, run(plain, False))
  np.testing.assert_array_equal(run(plain, True, 0), evaluated)
  first = run(module, True, 0)
  assert np.abs(first - evaluated).max() > 1e-3
  np.testing.assert_array_equal(run(module, True, 0), first)
  assert np.abs(run(module, True, 1) - first).max() > 1e-3
  with pytest.raises(Exception, match="dropout"):
    module.apply(variables, x, train=True)


def test_rope_augmentation_is_drawn_for_every_block(monkeypatch):
  """DINOv3's forward calls its rope_embed inside the block loop: each block sees its own draw."""
  drawn = []
  augment = layers.augment_rope_coords
  monkeypatch.setattr(layers, "augment_rope_coords", lambda *a, **k: drawn.append(augment(*a, **k)) or drawn[-1])
  module = models.create("dinov3_vits16", depth=3)
  variables = init(module)
  module.apply(variables, images((1, 32, 48, 3), seed=15), train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  assert len(drawn) == 3
  scales = [float(np.asarray(d)[0, 0]) for d in drawn]
  assert len(set(scales)) == 3
  drawn.clear()
  module.apply(variables, images((1, 32, 48, 3), seed=15), train=False)
  assert drawn == []


def test_rope_coordinate_augmentations():
  coords = layers.rope_coords((4, 6))
  np.testing.assert_allclose(coords[:6, 1], (np.arange(0.5, 6) / 6) * 2 - 1, rtol=1e-6)
  np.testing.assert_allclose(coords[::6, 0], (np.arange(0.5, 4) / 4) * 2 - 1, rtol=1e-6)
  np.testing.assert_allclose(layers.rope_coords((4, 6), "max")[::6, 0], (np.arange(0.5, 4) / 6) * 2 - 1, rtol=1e-6)
  rng = jax.random.PRNGKey(3)
  shifted = layers.augment_rope_coords(coords, rng, shift=0.5) - coords
  assert np.allclose(shifted, shifted[0], atol=1e-6) and np.all(np.abs(shifted[0]) <= 0.5) and shifted[0, 0] != \
      shifted[0, 1]
  jittered = layers.augment_rope_coords(coords, rng, jitter=1.5) / coords
  assert np.allclose(jittered, jittered[0], rtol=1e-5) and jittered[0, 0] != jittered[0, 1]
  assert np.all((jittered[0] >= 1 / 1.5) & (jittered[0] <= 1.5))
  rescaled = layers.augment_rope_coords(coords, rng, rescale=2.0) / coords
  assert np.allclose(rescaled, rescaled[0, 0], rtol=1e-5) and 0.5 <= rescaled[0, 0] <= 2.0


def torch_dinov3_rope(h, w, head_dim, dtype):
  """DINOv3's RopePositionEmbedding.forward (base 100, 'separate', no augmentation) in `dtype`."""
  periods = 100 ** (2 * torch.arange(head_dim // 4, dtype=dtype) / (head_dim // 2))
  coords_h = torch.arange(0.5, h, dtype=dtype) / h
  coords_w = torch.arange(0.5, w, dtype=dtype) / w
  coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
  coords = 2.0 * coords - 1.0
  angles = (2 * np.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
  return torch.sin(angles), torch.cos(angles)


def test_stored_rope_periods_are_used_as_the_hub_code_uses_them(official_b, tmp_path, capsys):
  # The release stores its periods rounded to bfloat16, and the hub model computes its float32 angles from them.
  state = dict(official_b)
  stored = state["rope_embed.periods"].to(torch.bfloat16).to(torch.float32)
  state["rope_embed.periods"] = stored
  module, _, meta = convert_file(tmp_path, state, "--rope-periods", "stored")
  assert meta["overrides"]["rope_periods"] == stored.tolist()
  sin, cos = module.rope((14, 20), train=False)
  coords_h, coords_w = torch.arange(0.5, 14) / 14, torch.arange(0.5, 20) / 20
  coords = 2.0 * torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
  angles = (2 * np.pi * coords[:, :, None] / stored[None, None, :]).flatten(1, 2).tile(2)
  np.testing.assert_allclose(np.asarray(sin), torch.sin(angles).numpy(), atol=2e-5)
  np.testing.assert_allclose(np.asarray(cos), torch.cos(angles).numpy(), atol=2e-5)
  computed_sin, _ = module.clone(rope_periods=None).rope((14, 20), train=False)
  assert np.abs(np.asarray(computed_sin) - np.asarray(sin)).max() > 1e-3  # the rounding is not negligible

  class Stored(_Args):
    rope_periods = "stored"

  without = {k: v for k, v in state.items() if k != "rope_embed.periods"}
  capsys.readouterr()
  convert_dinov3.from_checkpoint(state, None, "original", _Args())  # the default says what it leaves out
  assert "note: RoPE periods computed from the schedule" in capsys.readouterr().out
  with pytest.raises(core.ConversionError, match="--rope-periods stored: test checkpoint holds no rope_embed.periods"):
    convert_dinov3.from_checkpoint(without, None, "original", Stored())


def torch_dinov3_apply_rope(q, sin, cos):
  """DINOv3's SelfAttention.apply_rope on q (B, heads, N, D): cast to the RoPE dtype, rotate patches, cast back."""
  dtype = q.dtype
  q = q.to(sin.dtype)
  prefix = q.shape[-2] - sin.shape[-2]
  patches = q[:, :, prefix:]
  first, second = patches.chunk(2, dim=-1)
  patches = patches * cos + torch.cat([-second, first], dim=-1) * sin
  return torch.cat([q[:, :, :prefix], patches], dim=-2).to(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_follows_torch(dtype):
  torch_dtype = getattr(torch, dtype)
  sin_ref, cos_ref = torch_dinov3_rope(14, 20, 64, torch_dtype)
  coords = layers.rope_coords((14, 20), dtype=jnp.dtype(dtype))
  sin, cos = layers.rope_sin_cos(coords, layers.rope_periods(64, 100.0, jnp.dtype(dtype)), jnp.dtype(dtype))
  assert sin.dtype == jnp.dtype(dtype)
  q = torch.randn(2, 3, 5 + 14 * 20, 64, generator=torch.Generator().manual_seed(0))
  rotated_ref = torch_dinov3_apply_rope(q, sin_ref, cos_ref).numpy()
  rotated = np.asarray(layers.apply_rope(jnp.asarray(q.numpy()).transpose(0, 2, 1, 3), sin, cos)).transpose(0, 2, 1, 3)
  if dtype == "bfloat16":  # every step rounded to bfloat16 as torch rounds it: identical
    np.testing.assert_array_equal(np.asarray(sin, np.float32), sin_ref.float().numpy())
    np.testing.assert_array_equal(np.asarray(cos, np.float32), cos_ref.float().numpy())
    np.testing.assert_array_equal(rotated, rotated_ref)
  else:  # float32 sin, cos and pow differ by an ulp or two
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(rotated, rotated_ref, rtol=0, atol=1e-5)


def test_bfloat16_rope_stays_close_to_float32(small_hf):
  _, module, variables = small_hf
  x = images((1, 64, 64, 3), seed=15)
  f32 = np.asarray(module.apply(variables, x)["tokens"])
  bf16 = np.asarray(module.clone(rope_dtype="bfloat16").apply(variables, x)["tokens"])
  err = np.abs(bf16 - f32).max() / np.abs(f32).max()
  assert 1e-6 < err < 5e-2, err


@pytest.mark.parametrize("rate,keep", [(0.5, 4), (0.3, 5), (0.95, 1)])
def test_subset_drop_path_keeps_a_fixed_number_of_samples(rate, keep):
  """DINOv3's stochastic depth: exactly max(int(B (1 - p)), 1) samples add their branch, scaled by B / keep."""
  class Residual(nn.Module):
    @nn.compact
    def __call__(self, x, branch, train):
      return dinov3.subset_drop_path(self, x, branch, rate, train)

  x, branch = jnp.zeros((8, 3, 4)), jnp.ones((8, 3, 4))
  out = np.asarray(Residual().apply({}, x, branch, True, rngs={"dropout": jax.random.PRNGKey(0)}))
  assert np.all(out == out[:, :1, :1])  # whole samples are kept or dropped
  np.testing.assert_allclose(np.sort(out[:, 0, 0]), [0.0] * (8 - keep) + [8 / keep] * keep, rtol=1e-6)
  np.testing.assert_array_equal(Residual().apply({}, x, branch, False), x + branch)


# ------------------------------------------------------------------ converter refusals


def _corrupt(state: dict, blocks: str) -> dict:
  bad = dict(state)
  del bad[f"{blocks}3.ls1.gamma"]
  bad[f"{blocks}3.attn.extra"] = bad[f"{blocks}3.norm1.bias"]
  bad[f"{blocks}5.mlp.fc1.weight"] = bad[f"{blocks}5.mlp.fc1.weight"][:100]
  return bad


def test_converter_refuses_a_wrong_official_checkpoint_and_writes_nothing(official_b, tmp_path, capsys):
  ckpt, out = tmp_path / "broken.pth", tmp_path / "out"
  bad = _corrupt(official_b, "blocks.")
  bad["rope_embed.periods"] = bad["rope_embed.periods"] * 3
  torch.save(bad, ckpt)
  assert convert_cli.main(["dinov3", "--checkpoint", str(ckpt), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  for text in ("missing", "blocks.3.ls1.gamma", "unexpected", "blocks.3.attn.extra", "mis-shaped",
               "blocks.5.mlp.fc1.weight", "rope_embed.periods"):
    assert text in err, f"{text!r} not in the error:\n{err}"
  assert err.count("error:") == 1
  assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken.pth"]


def test_converter_refuses_wrong_meddinov3_and_hf_checkpoints(small_hf):
  state = official_state(*SIZES["b"], qkv_bias=False, seed=17)
  backbone = {"backbone." + k: core.to_numpy(v) for k, v in state.items()}
  with pytest.raises(core.ConversionError) as info:
    convert_dinov3.from_checkpoint({"teacher": _corrupt(backbone, "backbone.blocks.")}, None, "original", _Args())
  for text in ("backbone.blocks.3.ls1.gamma", "backbone.blocks.3.attn.extra", "backbone.blocks.5.mlp.fc1.weight"):
    assert text in str(info.value)

  model, _, _ = small_hf
  raw = {k: v.numpy() for k, v in model.state_dict().items()}
  bad = dict(raw)
  del bad["model.layer.1.layer_scale1.lambda1"]
  bad["model.layer.0.attention.k_proj.bias"] = raw["model.layer.0.attention.q_proj.bias"]
  bad["norm.weight"] = raw["norm.weight"][:10]
  with pytest.raises(core.ConversionError) as info:
    convert_dinov3.from_checkpoint(bad, model.config.to_dict(), "hf", _Args())
  for text in ("model.layer.1.layer_scale1.lambda1", "model.layer.0.attention.k_proj.bias", "norm.weight"):
    assert text in str(info.value)


def test_converter_refuses_an_uninitialized_bias_mask():
  state = {k: core.to_numpy(v) for k, v in official_state(*SIZES["s"], seed=18).items()}
  state["blocks.0.attn.qkv.bias_mask"] = np.full_like(state["blocks.0.attn.qkv.bias_mask"], np.nan)
  with pytest.raises(core.ConversionError, match="bias_mask"):
    convert_dinov3.from_checkpoint(state, None, "original", _Args())


def test_model_options_are_checked():
  with pytest.raises(ValueError, match="multiple of the patch size"):
    module = models.create("dinov3_vits16", depth=1)
    module.init(jax.random.PRNGKey(0), np.zeros((1, 40, 32, 3), np.float32))
  with pytest.raises(ValueError, match="normalization"):
    layers.rope_coords((2, 2), "diagonal")
  assert dinov3.MODELS["meddinov3_vitb16"]["ln_eps"] == 1e-6
