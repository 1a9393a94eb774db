"""The optimizer against torch: clip_grad_norm_ + AdamW with the paper's two parameter groups,
and the plateau rule against torch's ReduceLROnPlateau."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mfjax.train import optim

SHAPES = {"dense": {"kernel": (6, 5), "bias": (5,)}, "norm": {"scale": (5,)}, "pos": (1, 3, 5)}


def torch_step(torch_params, torch_opt, grads, clip_norm):
  for p, g in zip(torch_params, grads):
    p.grad = torch.from_numpy(np.array(g))
  torch.nn.utils.clip_grad_norm_(torch_params, clip_norm)
  torch_opt.step()


@pytest.mark.parametrize("grad_scale", [0.01, 10.0], ids=["below_clip", "clipped"])
def test_adamw_matches_torch(grad_scale):
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), SHAPES,
                        is_leaf=lambda s: isinstance(s, tuple))
  leaves, treedef = jax.tree.flatten(params)
  mask = jax.tree.leaves(optim.decay_mask(params))
  assert sum(mask) == 2  # dense kernel and the 3-D position embedding; biases and norms none
  lr, weight_decay, clip_norm = 1e-2, 0.05, 1.0
  tx = optim.make_optimizer(params, clip_norm=clip_norm, weight_decay=weight_decay)

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates)), opt_state

  torch_params = [torch.nn.Parameter(torch.from_numpy(np.array(x))) for x in leaves]
  torch_opt = torch.optim.AdamW(
      [{"params": [p for p, m in zip(torch_params, mask) if m], "weight_decay": weight_decay},
       {"params": [p for p, m in zip(torch_params, mask) if not m], "weight_decay": 0.0}], lr=lr)
  opt_state = tx.init(params)
  for _ in range(5):
    grads = [grad_scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert (norm > clip_norm) == (grad_scale > 1)
    params, opt_state = step(params, opt_state, jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads]))
    torch_step(torch_params, torch_opt, grads, clip_norm)
    for ours, theirs in zip(jax.tree.leaves(params), torch_params):
      np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clip_scales_every_gradient_by_torchs_factor():
  # A small global norm (1e-3), where torch's 1e-6 in the denominator shows.
  grads = {"a": jnp.full((4,), 3e-4), "b": jnp.full((2, 2), 4e-4)}
  clipped, _ = optim.clip_by_global_norm(1e-4).update(grads, optax.EmptyState())
  np.testing.assert_allclose(np.asarray(clipped["a"]), 3e-4 * 1e-4 / (1e-3 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["b"]), 4e-4 * 1e-4 / (1e-3 + 1e-6), rtol=1e-6)
  torch_grads = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 2))]
  for p, g in zip(torch_grads, grads.values()):
    p.grad = torch.from_numpy(np.array(g))
  torch.nn.utils.clip_grad_norm_(torch_grads, 1e-4)
  for ours, theirs in zip(clipped.values(), torch_grads):
    np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), rtol=1e-6)
  same, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  np.testing.assert_array_equal(np.asarray(same["b"]), np.asarray(grads["b"]))
  zero, _ = optim.clip_by_global_norm(1.0).update({"a": jnp.zeros(3)}, optax.EmptyState())
  np.testing.assert_array_equal(np.asarray(zero["a"]), np.zeros(3))


@pytest.mark.parametrize("metrics", [
    [0.5, 0.6, 0.6, 0.60001, 0.59, 0.58, 0.7, 0.7, 0.69, 0.68, 0.67, 0.66, 0.65, 0.71],
    [float("nan"), 0.5, 0.5, float("nan"), 0.49, 0.6, float("nan"), float("nan"), float("nan"), 0.61],  # one-class val
])
def test_plateau_matches_torch_reduce_lr_on_plateau(metrics):
  model = torch.nn.Linear(1, 1)
  torch_opt = torch.optim.SGD(model.parameters(), lr=1.0)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_opt, mode="max", factor=0.1, patience=2,
                                                         threshold=1e-4)
  plateau = optim.Plateau(patience=2, factor=0.1)
  for metric in metrics:
    scheduler.step(metric)
    plateau.update(metric)
    assert plateau.scale == pytest.approx(torch_opt.param_groups[0]["lr"], rel=1e-9)
  assert plateau.scale == pytest.approx(1e-3 if len(metrics) == 14 else 1e-2)  # each reduction where torch makes one


def test_plateau_stops_cutting_near_torchs_eps():
  """torch skips a cut smaller than eps=1e-8: from 1e-6, the rate stops at 1e-8, not 1e-9, 1e-10, ..."""
  model = torch.nn.Linear(1, 1)
  torch_opt = torch.optim.SGD(model.parameters(), lr=1e-6)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_opt, mode="max", factor=0.1, patience=0)
  plateau = optim.Plateau(patience=0, factor=0.1, lr=1e-6)
  for _ in range(8):
    scheduler.step(0.5)
    plateau.update(0.5)
    assert 1e-6 * plateau.scale == pytest.approx(torch_opt.param_groups[0]["lr"], rel=1e-9)
  assert 1e-6 * plateau.scale == pytest.approx(1e-8)


def test_plateau_counts_from_the_end_of_the_warmup():
  plateau = optim.Plateau(patience=0)
  assert not any(plateau.update(0.5, in_warmup=True) for _ in range(3))  # flat during the warmup: no cut
  assert plateau.best is None and plateau.scale == 1.0
  assert plateau.update(0.5) is False and plateau.update(0.5) is True and plateau.scale == pytest.approx(0.1)


def test_a_run_started_before_plateau_after_warmup_counts_its_warmup_as_it_did(tmp_path):
  from mfjax.cli import load_config
  from mfjax.train import fit
  for spec, as_it_ran in (("configs/paper.py:dataset=aptos2019", False), ("configs/tiny.py", True)):
    config = load_config(spec, [])
    saved = fit.to_dict(config)
    del saved["optim"]["plateau_after_warmup"]
    fit.as_it_ran(saved, config, tmp_path)
    assert config.optim.plateau_after_warmup is as_it_ran  # tiny.py has no warmup: nothing to keep


def test_plateau_restored_with_a_nan_best_starts_over():
  assert optim.Plateau(best=float("nan")).best is None  # an older checkpoint's host state
  plateau = optim.Plateau(patience=0, best=float("nan"))
  assert plateau.update(0.5) is False and plateau.best == 0.5


def test_warmup_is_linear_from_start_to_base():
  assert optim.warmup_lr(0, 1e-4, 10) == 1e-8
  assert optim.warmup_lr(5, 1e-4, 10) == pytest.approx(1e-8 + 5 * (1e-4 - 1e-8) / 10)
  assert optim.warmup_lr(10, 1e-4, 10) == 1e-4
  assert optim.warmup_lr(3, 1e-4, 0) == 1e-4
