"""ViT family parity: every converter and checkpoint format against its PyTorch reference.

Each test builds the reference with random weights, saves it in the released format, converts it
with `python -m convert`, loads it with `mfjax.models.load` and compares pooled, tokens and every
block's output at the native resolution and at one other, where position embeddings are resized
exactly as the source does it (DESIGN.md, "Numerics").
"""
import functools
import json
import math

import jax
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mfjax import models
from tests.parity import assert_close, capture_outputs, images, nchw, randomize, run_convert

torch.manual_seed(0)


def flax_outputs(model_dir, x):
  module, variables = models.load(model_dir)
  out = jax.jit(functools.partial(module.apply, return_blocks=True))(variables, x)
  return module, out


def compare(model_dir, x, pooled, tokens, blocks):
  module, out = flax_outputs(model_dir, x)
  assert_close("pooled", out["pooled"], pooled)
  assert_close("tokens", out["tokens"], tokens)
  assert len(out["blocks"]) == len(blocks)
  for i, (got, ref) in enumerate(zip(out["blocks"], blocks)):
    assert_close(f"block {i}", got, ref)
  return module


def torch_resample(pos, grid, method):
  """The source models' own F.interpolate calls on a (1, 1 + M*M, D) position embedding."""
  cls, patches = pos[:, :1], pos[:, 1:]
  m, d = int(math.sqrt(patches.shape[1])), pos.shape[-1]
  g = patches.reshape(1, m, m, d).permute(0, 3, 1, 2)
  if method == "deit_sqrt":  # the paper's deit.py
    g = F.interpolate(g, scale_factor=math.sqrt(grid[0] * grid[1] / (m * m)), mode="bicubic",
                      align_corners=False, recompute_scale_factor=False)
  elif method == "dino_offset":  # DINO's vision_transformer.py
    g = F.interpolate(g, scale_factor=((grid[0] + 0.1) / m, (grid[1] + 0.1) / m), mode="bicubic")
  elif method == "size":  # BLIP's interpolate_pos_embed
    g = F.interpolate(g, size=grid, mode="bicubic", align_corners=False)
  return torch.cat([cls, g.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)


def timm_at(name, state, res, method, **kw):
  """A timm ViT built for `res` holding `state` with its pos_embed resized by `method`."""
  model = timm.create_model(name, pretrained=False, img_size=res, num_classes=0, **kw).eval()
  state = dict(state)
  p = model.patch_embed.patch_size[0]
  state["pos_embed"] = torch_resample(state["pos_embed"], (res // p, res // p), method)
  model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
  return model


def timm_reference(model, x, n_prefix=1):
  with torch.no_grad(), capture_outputs(model.blocks) as blocks:
    feats = model.forward_features(nchw(x))
  return feats[:, 0], feats[:, n_prefix:], blocks


def hf_reference(model, x, n_prefix=1, interpolate=False, normed_tokens=True):
  with torch.no_grad():
    out = model(pixel_values=nchw(x), output_hidden_states=True,
                **({"interpolate_pos_encoding": True} if interpolate else {}))
  last = out.last_hidden_state
  tokens = last[:, n_prefix:] if normed_tokens else out.hidden_states[-1][:, n_prefix:]
  return last[:, 0], tokens, out.hidden_states[1:]


def save_hf(model, folder):
  model.save_pretrained(folder, safe_serialization=True)
  return str(folder)


# ----------------------------------------------------------------------------- DeiT


@pytest.fixture(scope="module")
def deit(module_tmp):
  tmp = module_tmp.mktemp("deit")
  ref = randomize(timm.create_model("deit_base_patch16_224", pretrained=False))
  path = tmp / "deit_base_patch16_224-b5f2ef4d.pth"
  torch.save({"model": ref.state_dict()}, path)  # as released: with the ImageNet head
  run_convert(["deit", "--checkpoint", str(path), "--out", str(tmp / "out")])
  return ref, path, tmp / "out"


def test_deit_original(deit):
  ref, _, out = deit
  x = images(2, 224)
  module = compare(out, x, *timm_reference(ref, x))
  assert module.posemb == "deit_sqrt"
  x = images(1, 256, seed=1)  # the paper's DeiT head resizes with scale_factor = sqrt(256 / 196)
  compare(out, x, *timm_reference(timm_at("deit_base_patch16_224", ref.state_dict(), 256, "deit_sqrt"), x))


def test_deit_hf(tmp_path):
  from transformers import ViTConfig, ViTModel
  ref = randomize(ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, image_size=224, patch_size=16)))
  run_convert(["deit", "--checkpoint", save_hf(ref, tmp_path / "hf"), "--out", str(tmp_path / "out")])
  x = images(2, 224)
  compare(tmp_path / "out", x, *hf_reference(ref, x))
  x = images(1, (224, 384), seed=1)  # not square: rows and columns must not trade places
  module = compare(tmp_path / "out", x, *hf_reference(ref, x, interpolate=True))
  assert module.ln_eps == pytest.approx(1e-12)  # read from config.json, as HF ViT uses it


def test_hf_vit_without_qkv_bias(tmp_path):
  from transformers import ViTConfig, ViTModel
  ref = randomize(ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, image_size=32, patch_size=8, qkv_bias=False)))
  run_convert(["deit", "--checkpoint", save_hf(ref, tmp_path / "hf"), "--out", str(tmp_path / "out")])
  x = images(2, (32, 48))
  module = compare(tmp_path / "out", x, *hf_reference(ref, x, interpolate=True))
  assert not module.qkv_bias


# ---------------------------------------------------------------------------- DINOv1


def test_dino_v1(tmp_path):
  ref = randomize(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), seed=1)
  path = tmp_path / "dino_vitbase16_pretrain.pth"
  torch.save(ref.state_dict(), path)
  run_convert(["dino", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
  x = images(2, 224)
  compare(tmp_path / "out", x, *timm_reference(ref, x))
  x = images(1, 320, seed=1)
  compare(tmp_path / "out", x, *timm_reference(
      timm_at("vit_base_patch16_224", ref.state_dict(), 320, "dino_offset"), x))


# ---------------------------------------------------------------------------- DINOv2


def dinov2_hub_reference(model, x):
  with torch.no_grad(), capture_outputs(model.blocks) as blocks:
    out = model.forward_features(nchw(x))
  return out["x_norm_clstoken"], out["x_prenorm"][:, 1:], blocks


def test_dinov2_hub(tmp_path):
  from dinov2.models.vision_transformer import vit_base
  ref = randomize(vit_base(patch_size=14, img_size=518, init_values=1.0, block_chunks=0), seed=2)
  path = tmp_path / "dinov2_vitb14_pretrain.pth"
  torch.save(ref.state_dict(), path)  # holds mask_token, ignored explicitly
  run_convert(["dinov2", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
  for res, seed in ((518, 0), (224, 1), ((224, 308), 2)):  # and not square: (w, h) are easily swapped
    x = images(1, res, seed)
    module = compare(tmp_path / "out", x, *dinov2_hub_reference(ref, x))
  assert models.read_model_json(tmp_path / "out")["name"] == "dinov2_vitb14"
  assert module.posemb == "dino_offset"


def test_dinov2_hub_giant_swiglu(tmp_path):
  """The g/14 SwiGLU FFN, at full width with 2 blocks (the 40-block model is 1.1B parameters)."""
  from dinov2.models.vision_transformer import DinoVisionTransformer
  ref = randomize(DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=1536, depth=2, num_heads=24,
                                        init_values=1.0, ffn_layer="swiglufused", block_chunks=0), seed=3)
  path = tmp_path / "dinov2_vitg14_pretrain.pth"
  torch.save(ref.state_dict(), path)
  run_convert(["dinov2", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
  x = images(1, 224)
  module = compare(tmp_path / "out", x, *dinov2_hub_reference(ref, x))
  assert (module.mlp_act, module.mlp_hidden, module.depth) == ("swiglu", 4096, 2)


def test_dinov2_hub_registers(tmp_path):
  """Hub `_reg4` files, referenced by timm's reg4 model (its no_embed_class layout is equivalent)."""
  ref = randomize(timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0), seed=4)
  timm_state = ref.state_dict()
  cls_pos = torch.randn(1, 1, 768) * 0.02
  hub = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
  hub.update(register_tokens=timm_state["reg_token"], cls_token=timm_state["cls_token"] - cls_pos,
             pos_embed=torch.cat([cls_pos, timm_state["pos_embed"]], dim=1), mask_token=torch.zeros(1, 768))
  path = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
  torch.save(hub, path)
  out = tmp_path / "out"
  run_convert(["dinov2", "--checkpoint", str(path), "--out", str(out)])
  assert models.read_model_json(out)["name"] == "dinov2_vitb14_reg4"
  x = images(1, 518)
  pooled, _, blocks = timm_reference(ref, x, n_prefix=5)
  compare(out, x, pooled, blocks[-1][:, 5:], blocks)  # DINOv2's tokens are pre-norm
  # At 224 the hub's `_reg` models (interpolate_offset=0, interpolate_antialias=True) resize the
  # checkpoint's 37x37 grid with this call (the installed dinov2 package predates registers).
  grid = hub["pos_embed"][:, 1:].reshape(1, 37, 37, 768).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
  at224 = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
  at224.load_state_dict(dict(timm_state, pos_embed=grid.permute(0, 2, 3, 1).reshape(1, 256, 768)))
  x = images(1, 224, seed=1)
  pooled, _, blocks = timm_reference(at224, x, n_prefix=5)
  module = compare(out, x, pooled, blocks[-1][:, 5:], blocks)
  assert module.posemb == "size_antialias"
  # A folder converted before this was fixed recorded 'dino_offset'; reading it (as load and training
  # do) corrects that, with a warning.
  meta = json.loads((out / models.MODEL_JSON).read_text())
  meta["overrides"]["posemb"] = "dino_offset"
  (out / models.MODEL_JSON).write_text(json.dumps(meta))
  with pytest.warns(UserWarning, match="dino_offset.*size_antialias"):
    assert models.read_model_json(out)["overrides"]["posemb"] == "size_antialias"
  with pytest.warns(UserWarning, match="dino_offset.*size_antialias"):
    assert models.load(out)[0].posemb == "size_antialias"


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_hf(tmp_path, registers):
  if registers:
    from transformers import Dinov2WithRegistersConfig as Config, Dinov2WithRegistersModel as Model
    extra = {"num_register_tokens": registers}
  else:
    from transformers import Dinov2Config as Config, Dinov2Model as Model
    extra = {}
  ref = randomize(Model(Config(image_size=518, patch_size=14, hidden_size=768, num_hidden_layers=12,
                               num_attention_heads=12, layerscale_value=1.0, **extra)), seed=5)
  run_convert(["dinov2", "--checkpoint", save_hf(ref, tmp_path / "hf"), "--out", str(tmp_path / "out")])
  name = models.read_model_json(tmp_path / "out")["name"]
  assert name == ("dinov2_vitb14_reg4" if registers else "dinov2_vitb14")
  for res, seed in ((518, 0), (224, 1)):
    x = images(1, res, seed)
    compare(tmp_path / "out", x, *hf_reference(ref, x, n_prefix=1 + registers, normed_tokens=False))


# --------------------------------------------------------------------------- OpenCLIP


def openclip_reference(model, x):
  with torch.no_grad(), capture_outputs(model.visual.transformer.resblocks) as blocks:
    pooled = model.encode_image(nchw(x))
  return pooled, blocks[-1][:, 1:], blocks


def test_openclip_original(tmp_path):
  import open_clip
  ref = randomize(open_clip.create_model("ViT-B-16", pretrained=None), seed=6)
  path = tmp_path / "open_clip_pytorch_model.bin"
  torch.save(ref.state_dict(), path)  # full CLIP: the text tower is ignored explicitly
  run_convert(["openclip", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
  x = images(2, 224)
  compare(tmp_path / "out", x, *openclip_reference(ref, x))
  # At 336 open_clip resizes at load (force_image_size): bicubic with antialias.
  at336 = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=336).eval()
  open_clip.load_checkpoint(at336, str(path))
  x = images(1, 336, seed=1)
  compare(tmp_path / "out", x, *openclip_reference(at336, x))


def test_openclip_quick_gelu(tmp_path):
  """OpenAI's CLIP weights through open_clip (and its *-quickgelu models): the same keys, QuickGELU MLPs."""
  import open_clip
  ref = randomize(open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True), seed=11)
  path = tmp_path / "open_clip_pytorch_model.bin"
  torch.save(ref.state_dict(), path)
  run_convert(["openclip", "--checkpoint", str(path), "--out", str(tmp_path / "out"), "--act", "quick_gelu"])
  assert models.read_model_json(tmp_path / "out")["overrides"]["mlp_act"] == "quick_gelu"
  x = images(1, 224)
  compare(tmp_path / "out", x, *openclip_reference(ref, x))
  at160 = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True, force_image_size=160).eval()
  open_clip.load_checkpoint(at160, str(path))
  x = images(1, 160, seed=1)
  compare(tmp_path / "out", x, *openclip_reference(at160, x))


def test_openclip_heads_follow_open_clips_head_width(tmp_path):
  """Heads are not in the tensors: ViT-H/g/bigG widths take open_clip's head widths (80, 88, 104);
  a tower of one's own config gives --heads."""
  import open_clip
  from convert import openclip
  zeros = lambda width: {"conv1.weight": np.zeros((width, 3, 14, 14)), "positional_embedding": np.zeros((5, width)),
                         "transformer.resblocks.0.attn.in_proj_weight": np.zeros((3 * width, width)),
                         "transformer.resblocks.0.mlp.c_fc.weight": np.zeros((4 * width, width))}
  for width, heads in ((768, 12), (1024, 16), (1280, 16), (1408, 16), (1664, 16)):
    assert openclip.arch_of(zeros(width), "t")["heads"] == heads
  cfg = open_clip.model.CLIPVisionCfg(layers=2, width=128, head_width=32, patch_size=14, image_size=28)
  ref = randomize(open_clip.model.CLIP(64, cfg, open_clip.model.CLIPTextCfg(layers=1, width=64, heads=2)), seed=3)
  path = tmp_path / "open_clip_pytorch_model.bin"
  torch.save(ref.state_dict(), path)
  x = images(1, 28)
  run_convert(["openclip", "--checkpoint", str(path), "--out", str(tmp_path / "default")])
  with pytest.raises(AssertionError, match=r"max\|delta\|"):  # 2 heads of 64, not 4 of 32: other attention
    compare(tmp_path / "default", x, *openclip_reference(ref, x))
  run_convert(["openclip", "--checkpoint", str(path), "--out", str(tmp_path / "out"), "--heads", "4"])
  compare(tmp_path / "out", x, *openclip_reference(ref, x))


def test_openclip_hf(tmp_path):
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  ref = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
      image_size=224, patch_size=16, projection_dim=512, hidden_act="gelu")), seed=7)
  run_convert(["openclip", "--checkpoint", save_hf(ref, tmp_path / "hf"), "--out", str(tmp_path / "out")])
  for res, seed in ((224, 0), (336, 1)):
    x = images(1, res, seed)
    with torch.no_grad():
      out = ref(pixel_values=nchw(x), output_hidden_states=True, interpolate_pos_encoding=res != 224)
    compare(tmp_path / "out", x, out.image_embeds, out.last_hidden_state[:, 1:], out.hidden_states[1:])


# ------------------------------------------------------------------------------ BLIP


@pytest.fixture(scope="module")
def blip(module_tmp):
  tmp = module_tmp.mktemp("blip")
  online = randomize(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), seed=8)
  momentum = randomize(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), seed=9)
  model = {f"visual_encoder.{k}": v for k, v in online.state_dict().items()}
  model.update({f"visual_encoder_m.{k}": v for k, v in momentum.state_dict().items()})
  model.update({"temp": torch.tensor(0.07), "image_queue": torch.randn(256, 8),
                "text_encoder.embeddings.word_embeddings.weight": torch.randn(16, 768),
                "vision_proj.weight": torch.randn(256, 768)})
  path = tmp / "model_base.pth"
  torch.save({"model": model, "epoch": 19}, path)
  return online, momentum, path, tmp


def test_blip_original(blip):
  online, momentum, path, tmp = blip
  run_convert(["blip", "--checkpoint", str(path), "--out", str(tmp / "online")])
  x = images(2, 224)
  compare(tmp / "online", x, *timm_reference(online, x))
  x = images(1, 384, seed=1)  # BLIP's loader resizes with F.interpolate(size=grid)
  compare(tmp / "online", x, *timm_reference(timm_at("vit_base_patch16_224", online.state_dict(), 384, "size"), x))


def test_blip_momentum_and_paper_feature(blip):
  online, momentum, path, tmp = blip
  run_convert(["blip", "--checkpoint", str(path), "--out", str(tmp / "m"), "--momentum-encoder",
               "--pooled", "first_patch"])
  x = images(1, 224)
  _, tokens, blocks = timm_reference(momentum, x)
  compare(tmp / "m", x, tokens[:, 0], tokens, blocks)  # the paper's feature: first patch token


def test_blip_hf(tmp_path):
  from transformers import BlipVisionConfig, BlipVisionModel
  ref = randomize(BlipVisionModel(BlipVisionConfig(image_size=224, patch_size=16, hidden_size=768,
                                                   intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12, layer_norm_eps=1e-5)), seed=10)
  run_convert(["blip", "--checkpoint", save_hf(ref, tmp_path / "hf"), "--out", str(tmp_path / "out")])
  for res, seed in ((224, 0), (384, 1)):
    x = images(1, res, seed)
    # HF's pooler_output applies post_layernorm twice; the CLS of last_hidden_state is BLIP's feature.
    compare(tmp_path / "out", x, *hf_reference(ref, x, interpolate=res != 224))


@pytest.mark.parametrize("override,message", [({"tokens": "norm"}, "unknown tokens 'norm'"),
                                              ({"pooled": "first-patch"}, "unknown pooled 'first-patch'"),
                                              ({"mlp_act": "gelu_new"}, "unknown mlp_act 'gelu_new'")])
def test_a_misspelt_model_option_is_named(override, message):
  module = models.create("dino_vitb16", depth=1, width=32, heads=2, mlp_hidden=64, **override)
  with pytest.raises(ValueError, match=message):
    module.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("name", ["dino_vitb16", "sam_vitb", "seem_focalt", "resnet50", "dinov3_vits16"])
def test_nchw_or_unbatched_images_get_a_plain_error(name):
  module = models.create(name)
  for shape, message in (((1, 3, 64, 64), "look like PyTorch's NCHW"), ((64, 64, 3), "expected NHWC images")):
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jax.numpy.float32))
