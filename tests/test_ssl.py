"""MedDINOv3 pretraining (mfjax.ssl): losses against PyTorch written from DINOv3's code, masks,
heads, crops, schedules, and a tiny end-to-end run with resume, export and bad inputs."""
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import pretrain as pretrain_config
from mfjax import models, parallel
from mfjax.config import ConfigError
from mfjax.data import volumes
from mfjax.ssl import augment, heads, losses, masking, pretrain
from tests.multiprocess import xla_devices


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------- PyTorch references
# Written from DINOv3's loss/*.py (single process: all_reduce is the identity).


def torch_sinkhorn(teacher_output, temp, iterations=3):
  q = torch.exp(teacher_output.float() / temp).t()
  b, k = q.shape[1], q.shape[0]
  q /= torch.sum(q)
  for _ in range(iterations):
    q /= torch.sum(q, dim=1, keepdim=True)
    q /= k
    q /= torch.sum(q, dim=0, keepdim=True)
    q /= b
  q *= b
  return q.t()


def torch_dino(student_logits, teacher_probs, ignore_diagonal=False, student_temp=0.1):
  s, b, _ = student_logits.shape
  t = teacher_probs.shape[0]
  log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
  if not ignore_diagonal:
    return -torch.einsum("sbk,tbk->", log_p, teacher_probs) / (b * s * t)
  loss = -torch.einsum("sbk,tbk->st", log_p, teacher_probs)
  m = min(s, t)
  loss = torch.diagonal_scatter(loss, loss.new_zeros(m))
  return loss.sum() / (b * s * t - b * m)


def torch_ibot(student_masked, teacher_masked, masks, student_temp=0.1):
  loss = torch.sum(teacher_masked * F.log_softmax(student_masked / student_temp, dim=-1), dim=-1)
  weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
  return -(loss * weights).sum() / masks.shape[0]


def torch_koleo(x, eps=1e-8):
  x = F.normalize(x, eps=eps, p=2, dim=-1)
  dots = torch.mm(x, x.t())
  n = x.shape[0]
  dots.view(-1)[::(n + 1)].fill_(-1)
  nearest = torch.max(dots, dim=1)[1]
  distances = torch.nn.PairwiseDistance(2, eps=eps)(x, x[nearest])
  return -torch.log(distances + eps).mean()


def torch_gram(student, teacher, student_grid, teacher_grid, img_level):
  b, _, d = teacher.shape
  if teacher_grid != student_grid:
    teacher = teacher.transpose(1, 2).reshape(b, d, *teacher_grid)
    teacher = F.interpolate(teacher, size=student_grid, mode="bicubic", align_corners=False)
    teacher = teacher.flatten(2).transpose(1, 2)
  teacher, student = F.normalize(teacher, dim=-1), F.normalize(student, dim=-1)
  if not img_level:
    teacher, student = teacher.flatten(0, 1), student.flatten(0, 1)
  return F.mse_loss(student @ student.transpose(-1, -2), teacher @ teacher.transpose(-1, -2))


def t(x):
  return torch.from_numpy(np.asarray(x, np.float32)).requires_grad_(True)


# ------------------------------------------------------------------------------- losses


def test_sinkhorn_knopp_matches_dinov3_and_is_balanced():
  logits = np.random.default_rng(0).normal(size=(12, 40)).astype(np.float32)
  ours = losses.sinkhorn_knopp(jnp.asarray(logits), 0.05)
  ref = torch_sinkhorn(torch.from_numpy(logits), 0.05).numpy()
  assert np.isfinite(ref).all()
  close(ours, ref)
  close(ours.sum(axis=1), np.ones(12))          # every sample's target is a distribution
  # Logits around 50 at temperature 0.04: exp(1250) overflows in the reference, not here.
  assert not np.isfinite(torch_sinkhorn(torch.from_numpy(logits + 50), 0.04).numpy()).all()
  close(losses.sinkhorn_knopp(jnp.asarray(logits + 50), 0.04), torch_sinkhorn(torch.from_numpy(logits), 0.04).numpy())


def test_sinkhorn_knopp_all_reduces_over_axis_name():
  logits = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
  full = losses.sinkhorn_knopp(jnp.asarray(logits), 0.07)
  per_device = jax.vmap(lambda x: losses.sinkhorn_knopp(x, 0.07, axis_name="devices"), axis_name="devices")
  sharded = per_device(jnp.asarray(logits).reshape(2, 4, 16)).reshape(8, 16)
  close(sharded, full)
  local_only = jax.vmap(lambda x: losses.sinkhorn_knopp(x, 0.07))(jnp.asarray(logits).reshape(2, 4, 16))
  assert not np.allclose(local_only.reshape(8, 16), full, atol=1e-4)


def test_dino_losses_match_dinov3():
  rng = np.random.default_rng(2)
  b, k = 3, 20
  student_global, student_local = rng.normal(size=(2, b, k)), rng.normal(size=(8, b, k))
  teacher = torch_sinkhorn(torch.from_numpy(rng.normal(size=(2 * b, k)).astype(np.float32)), 0.04)
  teacher = teacher.reshape(2, b, k).numpy()
  for ignore in (False, True):
    ours = losses.dino_loss(jnp.asarray(student_global, jnp.float32), jnp.asarray(teacher), 0.1, ignore)
    close(ours, torch_dino(t(student_global), torch.from_numpy(teacher), ignore).item())
  terms = losses.dino_cls_loss(jnp.asarray(student_global, jnp.float32), jnp.asarray(student_local, jnp.float32),
                               jnp.asarray(teacher), local_weight=0.5)
  local = torch_dino(t(student_local), torch.from_numpy(teacher)).item()
  global_ = torch_dino(t(student_global), torch.from_numpy(teacher), True).item()
  close(terms["dino_local"], local)
  close(terms["dino_global"], global_)
  close(terms["dino"], 16 / 18 * 0.5 * local + 2 / 18 * global_)


def test_ibot_loss_matches_dinov3_with_unmasked_images_counted():
  rng = np.random.default_rng(3)
  masks = np.zeros((4, 9), bool)
  masks[0, [1, 2, 5]] = True
  masks[2, [0, 8]] = True                      # images 1 and 3 have no mask but count in 1/(2B)
  m = int(masks.sum())
  student, teacher_logits = rng.normal(size=(m, 12)), rng.normal(size=(m, 12))
  teacher = torch_sinkhorn(torch.from_numpy(teacher_logits.astype(np.float32)), 0.07).numpy()
  per_crop = np.maximum(masks.sum(1, keepdims=True), 1)
  weights = np.broadcast_to(1.0 / per_crop, masks.shape)[masks].astype(np.float32)
  ours = losses.ibot_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher), jnp.asarray(weights), 4)
  close(ours, torch_ibot(t(student), torch.from_numpy(teacher), torch.from_numpy(masks)).item())


def test_koleo_matches_dinov3_value_and_gradient():
  x = np.random.default_rng(4).normal(size=(6, 16)).astype(np.float32)
  x[3] = x[1] * 2.0                            # same direction: distance ~0, eps keeps it finite
  value, grad = jax.value_and_grad(losses.koleo_loss)(jnp.asarray(x))
  xt = t(x)
  ref = torch_koleo(xt)
  ref.backward()
  close(value, ref.item(), 1e-4)
  assert np.isfinite(np.asarray(grad)).all()
  ok = [0, 2, 4, 5]                            # rows whose distance is not at the eps floor
  close(np.asarray(grad)[ok], xt.grad.numpy()[ok], 1e-3)


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("teacher_grid", [(4, 4), (6, 5)])
def test_gram_loss_matches_dinov3(img_level, teacher_grid):
  rng = np.random.default_rng(5)
  student = rng.normal(size=(2, 16, 8)).astype(np.float32)
  teacher = rng.normal(size=(2, teacher_grid[0] * teacher_grid[1], 8)).astype(np.float32)
  value, grad = jax.value_and_grad(losses.gram_loss)(jnp.asarray(student), jnp.asarray(teacher), (4, 4),
                                                     teacher_grid, img_level)
  st = t(student)
  ref = torch_gram(st, torch.from_numpy(teacher), (4, 4), teacher_grid, img_level)
  ref.backward()
  close(value, ref.item())
  close(grad, st.grad.numpy())


def test_a_run_started_before_mask_groups_collates_over_the_whole_batch(ct_folder, tmp_path):
  from mfjax.train import fit
  config = tiny_config(ct_folder)
  saved = fit.to_dict(config)
  del saved["masking"]["group_crops"]
  fit.as_it_ran(saved, config, tmp_path)
  assert config.masking.group_crops == 2 * config.batch_size
  as_dict = fit.to_dict(tiny_config(ct_folder))
  fit.as_it_ran(saved, as_dict, tmp_path)
  assert as_dict["masking"]["group_crops"] == 2 * config.batch_size


def test_a_small_slice_pool_is_named():
  assert "512 slices from a pool of 16 volumes (32 per volume" in pretrain.correlated_batches(512, 16)
  assert pretrain.correlated_batches(512, 64) == ""


def test_gram_over_the_batch_is_per_device_group():
  rng = np.random.default_rng(6)
  student, teacher = (jnp.asarray(rng.normal(size=(4, 16, 8)).astype(np.float32)) for _ in range(2))
  per_group = [losses.gram_loss(student[i:i + 2], teacher[i:i + 2], (4, 4), (4, 4), False) for i in (0, 2)]
  close(losses.gram_loss(student, teacher, (4, 4), (4, 4), False, groups=2), np.mean(per_group), 1e-6)
  assert abs(float(losses.gram_loss(student, teacher, (4, 4), (4, 4), False)) - float(np.mean(per_group))) > 1e-4


def test_masks_are_collated_per_group_and_gathered_per_group(ct_folder):
  config = tiny_config(ct_folder)
  crops = 2 * config.batch_size
  assert pretrain.mask_groups(config, 1) == 1 and pretrain.mask_groups(config, 2) == 2
  config.masking.group_crops = crops // 2
  assert pretrain.mask_groups(config, 1) == 2
  config.masking.group_crops = 3
  with pytest.raises(ConfigError, match=f"masking.group_crops=3 must divide the {crops} global crops"):
    pretrain.mask_groups(config, 1)
  config.masking.group_crops = crops // 2
  networks, _ = pretrain.build_networks(config)
  networks = dataclasses.replace(networks, mask_groups=2)
  pool = pretrain.SlicePool(pretrain.list_volumes(config.data.folders), config.seed, 2, 1)
  batch = pretrain.make_batch(config, pool, 0, networks, None)
  masks, indices, weights = batch["masks"], batch["mask_indices"], batch["mask_weights"]
  assert masks.shape[0] == crops and indices.shape[0] == weights.shape[0] == 2
  for j in range(2):  # each group: DINOv3's spread of mask counts over its own crops, indexed within them
    group = masks[j * crops // 2:(j + 1) * crops // 2].reshape(-1)
    np.testing.assert_array_equal(indices[j], np.flatnonzero(group))
    assert indices.shape[1] == sum(masking.masked_counts(crops // 2, masks.shape[1]))
  tokens = np.random.default_rng(0).normal(size=(crops, masks.shape[1], 3)).astype(np.float32)
  np.testing.assert_array_equal(pretrain.masked_patches(jnp.asarray(tokens), jnp.asarray(indices)),
                                tokens.reshape(-1, 3)[np.flatnonzero(masks)])


# ------------------------------------------------------------------------------- heads


def test_dino_head_shapes_normalisation_and_torch_equivalence():
  head = heads.DINOHead(out_dim=10, hidden_dim=12, bottleneck_dim=6)
  x = np.random.default_rng(6).normal(size=(5, 8)).astype(np.float32)
  params = head.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
  assert set(params) == {"mlp_0", "mlp_1", "mlp_2", "last_layer"}
  assert "bias" not in params["last_layer"] and params["last_layer"]["kernel"].shape == (6, 10)
  out = head.apply({"params": params}, jnp.asarray(x))
  assert out.shape == (5, 10)
  linear = lambda layer: (torch.tensor(np.asarray(params[layer]["kernel"])),
                          torch.tensor(np.asarray(params[layer]["bias"])))
  y = torch.from_numpy(x)
  for layer, act in (("mlp_0", True), ("mlp_1", True), ("mlp_2", False)):
    w, b = linear(layer)
    y = y @ w + b
    y = F.gelu(y) if act else y
  bottleneck = F.normalize(y, dim=-1)
  assert torch.allclose(bottleneck.norm(dim=-1), torch.ones(5))
  close(out, (bottleneck @ torch.tensor(np.asarray(params["last_layer"]["kernel"]))).numpy())
  # A zero input (a masked token at init) has a finite gradient, as F.normalize's.
  grad = jax.grad(lambda p: head.apply({"params": p}, jnp.zeros((1, 8))).sum())(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grad))


# ------------------------------------------------------------------------------- masking


def test_block_masks_exact_counts_shuffled_and_seeded():
  grid = (14, 14)
  expected = masking.masked_counts(16, 196)
  assert expected == [int(196 * r) for r in np.linspace(0.1, 0.5, 9)[1:]]
  arrangements = set()
  for seed in range(6):
    out = masking.collate_masks(np.random.default_rng(seed), 16, grid)
    counts = out["masks"].sum(axis=1)
    assert sorted(counts[counts > 0].tolist()) == expected and (counts == 0).sum() == 8
    assert out["indices"].shape == (sum(expected),)
    np.testing.assert_array_equal(out["indices"], np.flatnonzero(out["masks"]))
    np.testing.assert_allclose(out["weights"], np.repeat(1.0 / counts[counts > 0], counts[counts > 0]))
    arrangements.add(tuple(counts))
    again = masking.collate_masks(np.random.default_rng(seed), 16, grid)
    np.testing.assert_array_equal(again["masks"], out["masks"])
  assert len(arrangements) == 6, "masks are not shuffled across crops"


def test_block_mask_uses_rectangles_and_tops_up():
  rng = np.random.default_rng(7)
  mask = masking.block_mask(rng, (14, 14), 40)
  assert mask.sum() == 40
  # Blocks: most masked patches have a masked 4-neighbour (random patches rarely do).
  padded = np.pad(mask, 1)
  neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
  assert (neighbours & mask).sum() / mask.sum() > 0.8
  # A grid too small for any rectangle (w, h must be < the grid's) is filled with random patches.
  assert masking.block_mask(rng, (1, 8), 5).sum() == 5


# ------------------------------------------------------------------------------- crops


def test_multi_crop_shapes_ranges_and_determinism():
  slice_hu = np.random.default_rng(8).uniform(-2000, 3000, (50, 60)).astype(np.float32)
  out = augment.multi_crop(slice_hu, np.random.default_rng(0), 32, 16, 3, gram_size=48)
  assert out["global"].shape == (2, 32, 32, 3) and out["local"].shape == (3, 16, 16, 3)
  assert out["gram"].shape == (2, 48, 48, 3)
  lo, hi = (-1000 - augment.CT_MEAN) / augment.CT_STD, (1000 - augment.CT_MEAN) / augment.CT_STD
  for crops in out.values():
    assert crops.dtype == np.float32 and crops.min() >= lo - 1e-5 and crops.max() <= hi + 1e-5
    np.testing.assert_array_equal(crops[..., 0], crops[..., 2])
  again = augment.multi_crop(slice_hu, np.random.default_rng(0), 32, 16, 3, gram_size=48)
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  close(augment.normalize_ct(np.array([[-3000.0, 0.0, 65.1084, 5000.0]]))[0, :, 1],
        [(-1000 - 65.1084) / 178.0166, -65.1084 / 178.0166, 0.0, (1000 - 65.1084) / 178.0166])


def test_gram_crops_are_the_students_crops_as_dinov3_cuts_them():
  slice_hu = np.random.default_rng(8).uniform(-2000, 3000, (50, 60)).astype(np.float32)
  for seed in range(4):
    # Same size: the Gram teacher sees the student's global crops, photometric draw included.
    same = augment.multi_crop(slice_hu, np.random.default_rng(seed), 32, 16, 2, gram_size=32)
    np.testing.assert_array_equal(same["gram"], same["global"])
    # Larger Gram crops: one distorted cut at 48 px, resized to 32 for the student.
    big = augment.multi_crop(slice_hu, np.random.default_rng(seed), 32, 16, 2, gram_size=48)
    unit = lambda x: (x[..., 0] * augment.CT_STD + augment.CT_MEAN + 1000) / 2000
    for g, student in zip(big["gram"], big["global"]):
      close(unit(student), augment.resize(unit(g), 32))
  # Without distortions, at the same size, the Gram crop is the student's cut before its photometry.
  rng = np.random.default_rng(3)
  plain = augment.multi_crop(slice_hu, rng, 32, 16, 0, gram_size=32, gram_distortions=False, flips=False)
  box = augment.random_resized_crop_box(np.random.default_rng(3), 60, 50, augment.GLOBAL_SCALE)
  close(plain["gram"][0], augment.normalize(augment.crop_resize(augment.window(slice_hu), box, 32, False)))
  assert not np.allclose(plain["gram"][0], plain["global"][0])  # global 1 is always blurred


def test_gaussian_blur_matches_torchvision():
  import torchvision.transforms.functional as TF
  image = np.random.default_rng(9).uniform(size=(20, 24)).astype(np.float32)
  ref = TF.gaussian_blur(torch.from_numpy(image)[None], [9, 9], [1.3, 1.3])[0].numpy()
  close(augment.gaussian_blur(image, 1.3), ref)


# ------------------------------------------------------------------------------- schedules, optimizer


def dinov2_cosine_scheduler(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
  iters = np.arange(total - warmup - freeze)
  schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((np.zeros(freeze), np.linspace(start_warmup, base, warmup), schedule))


def test_schedules_match_dinov2_cosine_scheduler():
  ref = dinov2_cosine_scheduler(1e-3, 1e-6, 50, warmup=10, freeze=5)
  close([pretrain.cosine_schedule(i, 1e-3, 1e-6, 50, 10, 0.0, 5) for i in range(50)], ref, 1e-9)
  assert pretrain.cosine_schedule(60, 1e-3, 1e-6, 50, 10) == 1e-6
  c = pretrain_config.get_config("tiny=true,epochs=3,epoch_length=4")
  temps = [pretrain.schedules(c, i)["teacher_temp"] for i in range(12)]
  close(temps[:4], np.linspace(0.04, 0.07, 4), 1e-9)
  assert temps[4:] == [0.07] * 8
  first = pretrain.schedules(c, 0)
  assert first["last_layer_lr"] == 0.0 and pretrain.schedules(c, 4)["last_layer_lr"] > 0
  close(pretrain.schedules(c, 11)["momentum"], dinov2_cosine_scheduler(0.992, 1.0, 12)[11], 1e-9)


def dinov3_warmup_cosine(start, peak, end, warmup, total, cosine=None):
  """DINOv3's cosine_lr_scheduler.linear_warmup_cosine_decay, as an array over the run."""
  cosine = total - warmup if cosine is None else cosine
  ramp = np.linspace(start, peak, warmup, endpoint=False)
  wave = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2 + end
  return np.concatenate([ramp, wave, np.full(total - warmup - cosine, end)])


@pytest.mark.parametrize("start,peak,end,warmup,cosine", [(0, 0, 2.0, 6, 1), (1, 1, 0.5, 6, 1),
                                                          (0.2, 1.0, 0.1, 3, None), (0, 1, 0.5, 0, 4),
                                                          (1.5, 1.5, 1.5, 0, 0)])
def test_loss_weight_schedules_match_dinov3(start, peak, end, warmup, cosine):
  total = 10
  reference = dinov3_warmup_cosine(start, peak, end, warmup, total, cosine)
  ours = [pretrain.warmup_cosine(i, start, peak, end, warmup, total, -1 if cosine is None else cosine)
          for i in range(total + 2)]
  np.testing.assert_allclose(ours[:total], reference, rtol=0, atol=1e-12)
  assert ours[total:] == [end, end]
  # Through the config, in epochs: the Gram weight of DINOv3's Stage 2 (0 until the switch, then 2.0).
  c = pretrain_config.get_config("tiny=true,epochs=12,epoch_length=2")
  c.gram.weight_schedule = pretrain_config.weight_schedule(0.0, 0.0, 2.0, warmup_epochs=10, cosine_epochs=1,
                                                           enabled=True)
  weights = [pretrain.schedules(c, i)["gram_weight"] for i in range(24)]
  np.testing.assert_allclose(weights, dinov3_warmup_cosine(0.0, 0.0, 2.0, 20, 24, 2), atol=1e-12)
  assert weights[19:22] == [0.0, 0.0, 2.0]
  assert pretrain.schedules(c, 3)["local_weight"] == 1.0   # the constant while its schedule is off


def test_gram_refresh_follows_dinov3_rep_update():
  c = pretrain_config.get_config("tiny=true")
  c.gram.weight = 1.0
  for every, first, most in [(3, 0, 0), (3, 7, 2), (10, 10, 3), (4, 5, 1)]:
    c.gram.refresh_every, c.gram.first_refresh, c.gram.max_refreshes = every, first, most
    # DINOv3's train loop: after iteration `it`, refresh when (it + 1) >= first, (it + 1) % every == 0
    # and fewer than max_updates so far.
    expected, done = [], 0
    for it in range(60):
      if it + 1 >= first and (it + 1) % every == 0 and (not most or done < most):
        expected.append(it + 1)
        done += 1
    assert [s for s in range(61) if pretrain.gram_refresh_due(c, s)] == expected, (every, first, most)
  c.gram.weight = 0.0
  assert not any(pretrain.gram_refresh_due(c, s) for s in range(30))


def test_koleo_groups_are_dinov3_per_gpu_koleo():
  x = np.random.default_rng(5).normal(size=(8, 16)).astype(np.float32)
  per_gpu = np.mean([torch_koleo(t(x[i:i + 4])).detach().item() for i in (0, 4)])
  close(losses.koleo_loss(jnp.asarray(x), group_size=4), per_gpu, 1e-5)
  close(losses.koleo_loss(jnp.asarray(x), group_size=8), losses.koleo_loss(jnp.asarray(x)), 1e-7)


def test_parameter_plan_layer_decay_and_no_decay_groups():
  module = models.create("dinov3_vitb16", **pretrain_config.TINY_MODEL)
  params = {"backbone": models.init_params(module, image_size=(32, 32))["params"],
            "dino_head": heads.DINOHead(8, 8, 4).init(jax.random.PRNGKey(0), jnp.zeros((1, 32)))["params"]}
  plan = pretrain.parameter_plan(params, depth=2, layer_decay=0.9, patch_embed_mult=0.2)
  scale, decay, last = plan["lr_scale"], plan["decay"], plan["last"]
  close(scale["backbone"]["patch_embed"]["kernel"], 0.9 ** 3 * 0.2)
  close(scale["backbone"]["cls_token"], 0.9 ** 3)
  close(scale["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"], 0.9 ** 2)
  close(scale["backbone"]["blocks_1"]["mlp"]["fc1"]["kernel"], 0.9)
  assert scale["backbone"]["norm"]["scale"] == 1.0 and scale["dino_head"]["mlp_0"]["kernel"] == 1.0
  assert decay["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"] == 1.0
  for no_decay in (decay["backbone"]["blocks_0"]["attn"]["qkv"]["bias"], decay["backbone"]["blocks_0"]["ls1"]["gamma"],
                   decay["backbone"]["norm"]["scale"]):
    assert no_decay == 0.0
  for token in ("cls_token", "storage_tokens", "mask_token"):  # DINOv3 decays by name: tokens are decayed
    assert decay["backbone"][token] == 1.0
  assert last["dino_head"]["last_layer"]["kernel"] == 1.0 and last["dino_head"]["mlp_0"]["kernel"] == 0.0


# ------------------------------------------------------------------------------- data


def test_slice_pool_rotates_through_every_volume_as_a_function_of_the_step():
  paths = [f"v{i}.nii.gz" for i in range(5)]
  pool = pretrain.SlicePool(paths, seed=0, size=2, new_per_step=1)
  ids = [pool.volume_ids(step) for step in range(10)]
  assert all(len(i) == 2 for i in ids)
  assert all(ids[s][1] == ids[s + 1][0] for s in range(9))   # a window sliding over the shuffled stream
  assert sorted(ids[s][0] for s in range(5)) == list(range(5))  # each pass visits every volume once
  assert ids[7] == pretrain.SlicePool(paths, seed=0, size=2, new_per_step=1).volume_ids(7)
  assert ids != [pretrain.SlicePool(paths, seed=1, size=2, new_per_step=1).volume_ids(s) for s in range(10)]
  assert pretrain.SlicePool(paths, seed=0, size=9, new_per_step=1).volume_ids(3) == list(range(5))


def test_axial_slices_are_in_radiological_view(tmp_path):
  volume = np.zeros((4, 3, 2), np.float32)
  volume[3, 2, 1] = 1.0                         # most right (+x), most anterior (+y), upper slice
  path = volumes.write_volume(str(tmp_path / "v.nii.gz"), volume)
  slices = pretrain.axial_slices(path)
  assert slices.shape == (2, 3, 4) and slices[1, 0, 0] == 1.0 and slices.sum() == 1.0


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ct_folder(module_tmp):
  folder = module_tmp.mktemp("ct")
  rng = np.random.default_rng(10)
  for i, shape in enumerate([(40, 36, 6), (44, 40, 4), (38, 42, 5)]):
    volumes.write_volume(str(folder / f"case{i}.nii.gz"), rng.uniform(-1200, 1500, shape).astype(np.float32))
  return folder


def tiny_config(folder, **changes):
  c = pretrain_config.get_config("tiny=true")
  c.data.folders = str(folder)
  c.gram.weight = 0.5
  c.gram.teacher_step = 1
  c.gram.crop_size = 48                         # a 6x6 Gram-teacher grid resized to the 4x4 student grid
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_pretrain_end_to_end_resume_and_export(ct_folder, tmp_path, monkeypatch):
  config = tiny_config(ct_folder)
  result = pretrain.run(config, tmp_path / "full", progress=False)
  assert result["steps"] == 4
  lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  terms = ("loss", "dino", "dino_local", "dino_global", "ibot", "koleo", "grad_norm", "lr", "wd", "momentum",
           "teacher_temp")
  for line in lines:
    assert all(np.isfinite(line[f"train/{k}"]) for k in terms)
  assert "train/gram" not in lines[0] and all(np.isfinite(l["train/gram"]) for l in lines[1:])

  # Interrupted after the step-2 checkpoint, then resumed: the same numbers as the full run.
  make_batch = pretrain.make_batch

  def interrupted(config, pool, step, *args):
    if step == 3:
      raise KeyboardInterrupt
    return make_batch(config, pool, step, *args)

  monkeypatch.setattr(pretrain, "make_batch", interrupted)
  with pytest.raises(KeyboardInterrupt):
    pretrain.run(config, tmp_path / "resumed", progress=False)
  assert not (tmp_path / "resumed" / "backbone").exists()
  steps_run = []

  def recorded(config, pool, step, *args):
    steps_run.append(step)
    return make_batch(config, pool, step, *args)

  monkeypatch.setattr(pretrain, "make_batch", recorded)
  pretrain.run(config, tmp_path / "resumed", progress=False)
  assert steps_run == [2, 3], "the resumed run did not start from the step-2 checkpoint"
  assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
  # SIGTERM while step 2 runs (preemption): a checkpoint at step 3 and a clean exit; rerun finishes identically.
  def preempted(config, pool, step, *args):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return make_batch(config, pool, step, *args)

  monkeypatch.setattr(pretrain, "make_batch", preempted)
  assert pretrain.run(config, tmp_path / "preempted", progress=False) == {"status": "preempted", "step": 3}
  monkeypatch.setattr(pretrain, "make_batch", make_batch)
  pretrain.run(config, tmp_path / "preempted", progress=False)
  assert (tmp_path / "preempted" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
  module, full = models.load(tmp_path / "full" / "backbone")
  _, resumed = models.load(tmp_path / "resumed" / "backbone")
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  initial = models.init_params(module, jax.random.PRNGKey(config.seed), (32, 32))
  assert not np.allclose(full["params"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                         initial["params"]["blocks_0"]["mlp"]["fc1"]["kernel"])

  # The exported teacher backbone is a converted model: features at any multiple of the patch size.
  assert module.width == 32 and module.depth == 2 and module.qkv_bias is False
  out = module.apply(full, jnp.ones((2, 48, 40, 3)))
  assert out["pooled"].shape == (2, 32) and out["tokens"].shape == (2, 30, 32)
  assert np.isfinite(np.asarray(out["tokens"])).all()
  # A finished run returns its result; continuing from the export (Gram teacher from it too) runs.
  assert pretrain.run(config, tmp_path / "full", progress=False)["steps"] == 4
  backbone = str(tmp_path / "full" / "backbone")
  stage2 = tiny_config(ct_folder, epochs=1, epoch_length=1, **{"model.checkpoint": backbone,
                                                              "gram.checkpoint": backbone, "gram.teacher_step": 0})
  result = pretrain.run(stage2, tmp_path / "stage2", progress=False)
  assert np.isfinite(result["final"]["train/gram"])


def test_three_stage_recipe_continues_refreshes_and_mixes_sizes(ct_folder, tmp_path, monkeypatch):
  """Stage 1 exports intermediate backbones; Stage 2 starts from Stage 1's EMA teacher (heads
  included) against an intermediate Gram teacher, with DINOv3's weight schedules, a Gram-teacher
  refresh and per-group KoLeo; Stage 3 mixes crop sizes per step."""
  stage1 = tiny_config(ct_folder, **{"gram.weight": 0.0, "gram.crop_size": 0, "export_every_steps": 2})
  pretrain.run(stage1, tmp_path / "s1", progress=False)
  assert (tmp_path / "s1" / "backbones" / "step_2" / "model.json").exists()
  assert not (tmp_path / "s1" / "backbones" / "step_4").exists()   # the final one is backbone/
  _, intermediate = models.load(tmp_path / "s1" / "backbones" / "step_2")
  _, final = models.load(tmp_path / "s1" / "backbone")
  assert not np.allclose(intermediate["params"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                         final["params"]["blocks_0"]["mlp"]["fc1"]["kernel"])

  stage2 = tiny_config(ct_folder, epochs=3, epoch_length=2, **{
      "model.init_from_run": str(tmp_path / "s1"), "gram.weight": 0.0, "gram.crop_size": 0,
      "gram.checkpoint": str(tmp_path / "s1" / "backbones" / "step_2"), "gram.teacher_step": 0,
      "gram.refresh_every": 2, "gram.first_refresh": 4, "gram.max_refreshes": 1, "loss.koleo_group_size": 2})
  stage2.gram.weight_schedule = pretrain_config.weight_schedule(0.0, 0.0, 2.0, warmup_epochs=1, cosine_epochs=1,
                                                                enabled=True)
  stage2.loss.local_weight_schedule = pretrain_config.weight_schedule(1.0, 1.0, 0.5, warmup_epochs=1,
                                                                      cosine_epochs=1, enabled=True)
  seen = []
  real_step = pretrain.jitted_train_step

  def watched(state, batch, sched, plan, **kwargs):
    leaf = lambda tree: np.asarray(tree["blocks_0"]["mlp"]["fc1"]["kernel"]).copy()
    seen.append({"step": int(state["step"]), "gram": leaf(state["gram"]), "teacher": leaf(state["teacher"]["backbone"]),
                 "dino_head": np.asarray(state["student"]["dino_head"]["last_layer"]["kernel"]).copy(),
                 "global": batch["global"].shape})
    return real_step(state, batch, sched, plan, **kwargs)

  monkeypatch.setattr(pretrain, "jitted_train_step", watched)
  pretrain.run(stage2, tmp_path / "s2", progress=False)
  saved = pretrain.RunCheckpoints(tmp_path / "s1").restore_latest_as_saved(None)[1]
  np.testing.assert_array_equal(seen[0]["dino_head"], np.asarray(saved["teacher"]["dino_head"]["last_layer"]["kernel"]))
  np.testing.assert_array_equal(seen[0]["teacher"], final["params"]["blocks_0"]["mlp"]["fc1"]["kernel"])
  gram_leaf = intermediate["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  for record in seen[:4]:
    np.testing.assert_array_equal(record["gram"], gram_leaf)
  for record in seen[4:]:            # refreshed once, before step 4, from the EMA teacher of then
    np.testing.assert_array_equal(record["gram"], seen[4]["teacher"])
  lines = [json.loads(l) for l in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
  assert [l["train/gram_weight"] for l in lines] == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0]
  assert [l["train/local_weight"] for l in lines] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]

  stage3 = tiny_config(ct_folder, **{"model.init_from_run": str(tmp_path / "s2"), "gram.crop_size": 0,
                                     "gram.checkpoint": str(tmp_path / "s1" / "backbone"), "gram.teacher_step": 0,
                                     "data.mixed_sizes": ((32, 16, 48, 1.0), (48, 24, 64, 1.0))})
  seen.clear()
  pretrain.run(stage3, tmp_path / "s3", progress=False)
  sizes = [pretrain.step_sizes(stage3, i) for i in range(4)]
  assert {s[0] for s in sizes} == {32, 48}
  assert [r["global"][1] for r in seen] == [s[0] for s in sizes]

  with pytest.raises(ConfigError, match="different|another network"):
    pretrain.run(tiny_config(ct_folder, **{"model.init_from_run": str(tmp_path / "s1"), "heads.hidden_dim": 48}),
                 tmp_path / "bad", progress=False)


def test_a_volume_whose_voxels_cannot_be_read_is_left_out_and_listed(ct_folder, tmp_path, caplog):
  """A truncated download passes the header check at the start; when it enters the pool, the run
  leaves it out with a warning instead of stopping (and a resume would do the same)."""
  import shutil
  folder = tmp_path / "ct"
  shutil.copytree(ct_folder, folder)
  data = (folder / "case1.nii.gz").read_bytes()
  (folder / "case1.nii.gz").write_bytes(data[:-200])
  pretrain.check_volumes(pretrain.list_volumes(str(folder)), progress=False)  # the header reads
  # So does a truncated file stored in another orientation: reorienting it would read its voxels.
  lps = tmp_path / "lps.nii.gz"
  volumes.write_volume(str(lps), np.random.default_rng(0).standard_normal((32, 32, 16), np.float32),
                       affine=np.diag([-1.0, -1.0, 2.0, 1.0]))
  lps.write_bytes(lps.read_bytes()[:-200])
  volumes.check_header(str(lps))
  with pytest.raises(volumes.VolumeError, match="lps.nii.gz: not a readable NIfTI volume"):
    volumes.read_volume(str(lps))  # read whole, it fails as a VolumeError: the pool leaves it out
  import nibabel as nib
  nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
  with pytest.raises(volumes.VolumeError, match=r"expected a 3-D volume, got shape \(8, 8\)"):
    volumes.check_header(str(tmp_path / "flat.nii.gz"))
  with caplog.at_level("WARNING", logger="mfjax"):
    result = pretrain.run(tiny_config(folder), tmp_path / "run", progress=False)
  assert result["unreadable_volumes"] == [str(folder / "case1.nii.gz")]
  assert [r for r in caplog.records if "case1.nii.gz" in r.getMessage() and "left out" in r.getMessage()]
  pool = pretrain.SlicePool([str(folder / "case1.nii.gz")], 0, 1, 1)
  with pytest.raises(volumes.VolumeError, match="no volume of its pool can be read.*case1.nii.gz"):
    pool.sample(0, np.random.default_rng(0), 2)


def test_bad_inputs_name_the_file_or_key(ct_folder, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError, match=re.escape(str(empty))):
    pretrain.run(tiny_config(empty), tmp_path / "w1", progress=False)
  with pytest.raises(ConfigError, match=re.escape(f"names one folder twice ({ct_folder} and {ct_folder}/)")):
    pretrain.list_volumes(f"{ct_folder},{ct_folder}/")
  with pytest.raises(ConfigError, match="names one folder twice"):
    pretrain.list_volumes((str(ct_folder),) * 2)  # one string twice
  with pytest.raises(ConfigError, match="is not a folder"):
    pretrain.list_volumes(str(tmp_path / "missing"))
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "bad.nii.gz").write_bytes(b"not a nifti volume")
  with pytest.raises(volumes.VolumeError, match="bad.nii.gz"):
    pretrain.run(tiny_config(corrupt), tmp_path / "w2", progress=False)
  flat = tmp_path / "flat"
  volumes.write_volume(str(flat / "slice.nii"), np.zeros((8, 8, 2, 2), np.float32))
  with pytest.raises(volumes.VolumeError, match="slice.nii"):
    pretrain.axial_slices(str(flat / "slice.nii"))
  # Among good volumes, a bad one fails the start (headers are checked first), not the step that reads it.
  for i in range(3):
    volumes.write_volume(str(flat / f"good{i}.nii.gz"), np.zeros((8, 8, 3), np.float32))
  with pytest.raises(volumes.VolumeError, match=r"slice.nii: expected a 3-D volume"):
    pretrain.run(tiny_config(flat), tmp_path / "w3", progress=False)
  assert not (tmp_path / "w3").exists()
  with pytest.raises(ConfigError, match="unknown config argument 'bogus'.*n_local"):
    pretrain_config.get_config("tiny=true,bogus=1")
  with pytest.raises(ConfigError, match="DINOv3-family"):
    pretrain.build_networks(tiny_config(ct_folder, **{"model.name": "dinov2_vitb14"}))
  with pytest.raises(ConfigError, match="gram.weight"):
    pretrain.build_networks(tiny_config(ct_folder, **{"gram.weight": 0.0}))
  with pytest.raises(ConfigError, match="gram.refresh_every"):
    pretrain.build_networks(tiny_config(ct_folder, **{"gram.weight": 0.0, "gram.crop_size": 0,
                                                      "gram.refresh_every": 5}))
  with pytest.raises(ConfigError, match="gram.first_refresh=3 .* gram.refresh_every, which is 0"):
    pretrain.build_networks(tiny_config(ct_folder, **{"gram.first_refresh": 3}))
  with pytest.raises(ConfigError, match="gram.distortions=False acts on the Gram teacher's own crops"):
    pretrain.build_networks(tiny_config(ct_folder, **{"gram.crop_size": 0, "gram.distortions": False}))
  with pytest.raises(ConfigError, match="loss.koleo_group_size=3"):
    pretrain.build_networks(tiny_config(ct_folder, **{"loss.koleo_group_size": 3}))
  with pytest.raises(ConfigError, match="unknown model.dtype 'float16x'; valid: float32, bfloat16"):
    pretrain.build_networks(tiny_config(ct_folder, **{"model.dtype": "float16x"}))
  with pytest.raises(ConfigError, match=re.escape("data.mixed_sizes[1]=(48, 24)")):
    pretrain.build_networks(tiny_config(ct_folder, **{"gram.crop_size": 0,
                                                      "data.mixed_sizes": ((32, 16, 48, 1.0), (48, 24))}))
  with pytest.raises(ConfigError, match="gram.crop_size=48 and data.mixed_sizes"):
    pretrain.build_networks(tiny_config(ct_folder, **{"data.mixed_sizes": ((32, 16, 48, 1.0),)}))
  with pytest.raises(ConfigError, match="model.init_from_run and model.checkpoint"):
    pretrain.build_networks(tiny_config(ct_folder, **{"model.init_from_run": "a", "model.checkpoint": "b"}))
  too_long = tiny_config(ct_folder)
  too_long.loss.local_weight_schedule = pretrain_config.weight_schedule(1, 1, 0.5, 2, 1, enabled=True)
  with pytest.raises(ConfigError, match="loss.local_weight_schedule.*epochs=2"):
    pretrain.build_networks(too_long)
  # The defaults' warmups (10 and 30 epochs) do not fit an 8-epoch stage; a constant temperature does.
  stage = tiny_config(ct_folder, **{"optim.warmup_epochs": 10, "teacher.temp_warmup_epochs": 30})
  with pytest.raises(ConfigError, match=r"optim.warmup_epochs=10, teacher.temp_warmup_epochs=30 .*epochs=2"):
    pretrain.build_networks(stage)
  pretrain.check_config(tiny_config(ct_folder, **{"teacher.temp_warmup_epochs": 30, "teacher.warmup_temp": 0.07}))
  pretrain.check_config(stage, resuming=True)  # a run started before the rule goes on (with a warning)
  with pytest.raises(ConfigError, match=r"optim.base_lr=-0.001 is outside \(0, inf\)"):
    pretrain.check_config(tiny_config(ct_folder, **{"optim.base_lr": -1e-3}))
  with pytest.raises(ConfigError, match="not an `mfjax pretrain` run"):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"protocol": {"name": "frozen_linear"}}')
    pretrain.teacher_of_run(tiny_config(ct_folder, **{"model.init_from_run": str(tmp_path / "other")}), None)
  # Met in a run, the error closes the run's checkpoints (left open, orbax's cleanup thread printed a
  # traceback at exit).
  with pytest.raises(ConfigError, match="not an `mfjax pretrain` run"):
    pretrain.run(tiny_config(ct_folder, **{"model.init_from_run": str(tmp_path / "other")}), tmp_path / "w3",
                 progress=False)
  from mfjax.train.checkpoints import RunCheckpoints
  assert not RunCheckpoints._owned


def test_default_config_is_the_reference_recipe():
  c = pretrain_config.get_config()
  assert c.model.name == "meddinov3_vitb16" and c.heads.dino_prototypes == 65536
  assert (c.data.global_size, c.data.local_size, c.data.n_local) == (224, 96, 8)
  assert (c.teacher.momentum, c.teacher.warmup_temp, c.teacher.temp) == (0.992, 0.04, 0.07)
  assert (c.optim.weight_decay, c.optim.final_weight_decay, c.optim.clip_norm) == (0.04, 0.4, 3.0)
  lr = pretrain.schedules(c, c.optim.warmup_epochs * c.epoch_length)["lr"]
  close(lr, 4e-3 * math.sqrt(512 / 1024), 1e-9)


def test_train_step_combines_losses_updates_and_ema(ct_folder):
  config = tiny_config(ct_folder)
  networks, _ = pretrain.build_networks(config)
  state = pretrain.initial_state(config, networks, None)
  state["teacher"] = jax.tree_util.tree_map(lambda x: x + 0.01, state["teacher"])
  plan = jax.tree_util.tree_map(jnp.float32, pretrain.parameter_plan(state["student"], 2, 0.9, 0.2))
  pool = pretrain.SlicePool(pretrain.list_volumes(config.data.folders), config.seed, 2, 1)
  batch = pretrain.make_batch(config, pool, 0, networks, None)
  before = jax.tree_util.tree_map(np.asarray, state)
  lr, wd, m = 1e-3, 0.04, 0.9
  sched = {"lr": lr, "last_layer_lr": 0.0, "wd": wd, "momentum": m, "teacher_temp": 0.05, "local_weight": 1.0,
           "gram_weight": 0.5}
  new, metrics = pretrain.jitted_train_step(state, batch, jax.tree_util.tree_map(jnp.float32, sched), plan,
                                            networks=networks, use_gram=True,
                                            state_sharding=parallel.replicated(parallel.make_mesh()))
  metrics = {k: float(v) for k, v in metrics.items()}
  close(metrics["loss"], metrics["dino"] + metrics["ibot"] + 0.1 * 2 * metrics["koleo"] + 0.5 * metrics["gram"], 1e-5)
  assert int(new["step"]) == 1
  student = jax.tree_util.tree_map(np.asarray, new["student"])
  for name in pretrain.HEADS:
    np.testing.assert_array_equal(student[name]["last_layer"]["kernel"],
                                  before["student"][name]["last_layer"]["kernel"])
  # One AdamW step moves each parameter by at most lr * lr_scale * (1 + wd * |p|) (|adam| <= 1 at step 1).
  moved = jax.tree_util.tree_map(
      lambda new_p, p, scale, decay: float(np.max(np.abs(new_p - p + lr * scale * wd * decay * p)) / (lr * scale)),
      student, before["student"], jax.tree_util.tree_map(float, plan["lr_scale"]),
      jax.tree_util.tree_map(float, plan["decay"]))
  assert max(jax.tree_util.tree_leaves(moved)) <= 1.0 + 1e-4
  assert moved["backbone"]["blocks_1"]["mlp"]["fc1"]["kernel"] > 0.5
  ema = jax.tree_util.tree_map(lambda t_, s_: m * t_ + (1 - m) * s_, before["teacher"], student)
  for a, b in zip(jax.tree_util.tree_leaves(new["teacher"]), jax.tree_util.tree_leaves(ema)):
    close(a, b, 1e-6)


def test_pretrain_splits_the_batch_over_devices(ct_folder, tmp_path):
  """Two simulated devices (a separate process: the device count is fixed at JAX's start) give
  the one-device run's first step: the crops are split, the losses' sums stay global."""
  # Masks collated per group of a fixed size are the same on any device count (by default each
  # device's crops are one group, as DINOv3's per-GPU collation).
  config = tiny_config(ct_folder, epochs=1, epoch_length=1, **{"masking.group_crops": 4})
  one = pretrain.run(config, tmp_path / "one", progress=False)
  script = (f"from configs import pretrain as c; from mfjax.ssl import pretrain; import json\n"
            f"import jax, numpy as np; from mfjax import parallel\n"
            f"config = c.get_config('tiny=true,epochs=1,epoch_length=1')\n"
            f"config.data.folders = {str(ct_folder)!r}; config.gram.weight = 0.5; config.gram.teacher_step = 1\n"
            f"config.gram.crop_size = 48; config.masking.group_crops = 4\n"
            f"result = pretrain.run(config, {str(tmp_path / 'two')!r}, progress=False)\n"
            # Each device gathers the masked patches of its own crops, and keeps them.
            f"split = parallel.batch_sharding(parallel.make_mesh())\n"
            f"tokens = parallel.put_global(np.arange(8 * 5 * 3, dtype=np.float32).reshape(8, 5, 3), split)\n"
            f"indices = parallel.put_global(np.array([[0, 7, 19], [1, 2, 3]], np.int32), split)\n"
            f"out = jax.jit(pretrain.masked_patches)(tokens, indices)\n"
            f"result['shards'] = [list(s.data.shape) for s in out.addressable_shards]\n"
            f"result['rows'] = np.asarray(out)[:, 0].tolist()\n"
            f"print(json.dumps(result))")
  env = dict(os.environ, XLA_FLAGS=xla_devices(2), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (one["devices"], two["devices"]) == (1, 2)
  assert two["shards"] == [[3, 3], [3, 3]]
  assert two["rows"] == [0, 21, 57, 63, 66, 69]  # group 1 starts at crop 4: its token 1 is token 21 of all
  for key in ("train/dino", "train/dino_local", "train/dino_global", "train/ibot"):
    close(two["final"][key], one["final"][key], 1e-4)
  # KoLeo takes the log of nearest-neighbour distances of ~1e-4 here (the CLS tokens of a random
  # tiny model barely differ): the rounding of a differently split matmul shows at 1e-3.
  for key in ("train/koleo", "train/loss"):
    close(two["final"][key], one["final"][key], 2e-2)


def test_a_resume_refuses_a_changed_volume_list(ct_folder, tmp_path):
  folder = tmp_path / "ct"
  shutil.copytree(ct_folder, folder)
  config = tiny_config(folder, **{"epochs": 1, "epoch_length": 2})
  pretrain.run(config, tmp_path / "run", progress=False)
  (tmp_path / "run" / "result.json").unlink()  # as if stopped after its last checkpoint
  shutil.rmtree(tmp_path / "run" / "backbone")
  shutil.copy(folder / "case0.nii.gz", folder / "case9.nii.gz")
  with pytest.raises(ConfigError, match=r"now hold another list of volumes \(4\) than the list of 3"):
    pretrain.run(config, tmp_path / "run", progress=False)
  (folder / "case9.nii.gz").unlink()
  assert pretrain.run(config, tmp_path / "run", progress=False)["steps"] == 2
