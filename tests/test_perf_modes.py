"""The speed and memory options compute what the plain float32 model computes: bf16 compute within
a stated tolerance of float32 (parameters and optimizer state stay float32), remat policies and
scanned blocks to rounding, and GELU as torch computes it; freed host memory is kept for reuse."""
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from benchmarks import common
from mfjax import cpu_gemm
from mfjax import data as mdata
from mfjax import models
from mfjax.cli import load_config
from mfjax.data import synthetic
from mfjax.models import heads, layers
from mfjax.train import fit

# bf16 compute against float32, same float32 parameters (README, "Performance"):
BF16_OUTPUT_RTOL = 3e-2   # max |delta| <= 3e-2 x max |float32| on embedding, tokens, logits
BF16_LOSS_RTOL = 1e-2     # |loss delta| <= 1e-2 x loss
BF16_GRAD_COSINE = 0.999  # cosine similarity of the flattened gradients
BF16_GRAD_COSINE_CONV = 0.99  # ResNet's: through every convolution of a deep conv net (0.9954 on 2026-12-07)
BF16_GRAD_NORM_RTOL = 2e-2
BF16_MIN_DIFFERENCE = 1e-4  # and bf16 is really used: float32 everywhere would differ by ~1e-7

SMALL = dict(width=96, depth=3, heads=3, mlp_hidden=192)
SMALL_BY_NAME = {"sam_vitb": dict(SMALL, window=2, global_blocks=(1,), neck_features=32),
                 # two focal levels, not SEEM's three: its 7x7 depthwise kernels, unrolled, slow the compile
                 "seem_focalt": dict(embed_dim=32, depths=(1, 1, 2, 1), focal_levels=(2, 2, 2, 2)),
                 "resnet152": dict(depths=(1, 1, 1, 1))}


def small(name, **kw):
  res = 42 if name.startswith("dinov2") else 64 if name == "seem_focalt" else 48
  return models.create(name, **SMALL_BY_NAME.get(name, SMALL), native_resolution=(res, res), **kw), res


def images(n, res, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, res, res, 3)), jnp.float32)


def rel(got, ref):
  return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


def flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])


# Each model runs as one compiled program: op by op, JAX compiles every primitive on its own (a
# FocalNet's init alone: 13 s against 5 s).
@functools.partial(jax.jit, static_argnums=0)
def init(module, x):
  return module.init(jax.random.PRNGKey(0), x)


@functools.partial(jax.jit, static_argnums=(0, 3))
def apply(module, variables, x, return_blocks=False):
  return module.apply(variables, x, return_blocks=return_blocks)


@functools.partial(jax.jit, static_argnums=0)
def outputs_and_tokens(classifier, variables, x):
  """The classifier's outputs and its foundation's tokens, in one program (one foundation to compile)."""
  tokens = classifier.apply(variables, x, method=lambda m, x: m.foundation(x))["tokens"]
  return classifier.apply(variables, x, return_blocks=True), tokens


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(classifier, variables, x, y):
  def loss(p):
    logits = classifier.apply({**variables, "params": p}, x)["logits"]  # BatchNorm's statistics as they are
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jax.value_and_grad(loss)(variables["params"])


@pytest.mark.parametrize("name", ["deit_base_patch16", "dinov2_vitb14", "openclip_vitb16", "sam_vitb",
                                  "seem_focalt", "resnet152", "dinov3_vitb16", "blip_vitb16", "dino_vitb16"])
def test_bf16_compute_matches_float32(name):
  foundation, res = small(name)
  f32 = heads.Classifier(foundation, 5)
  b16 = heads.Classifier(small(name, dtype="bfloat16")[0], 5)
  x, y = images(4, res), jnp.array([0, 1, 2, 3])
  variables = init(f32, x)
  # bf16 mode creates float32 parameters: the same tree, the same dtypes.
  b16_abstract = jax.eval_shape(b16.init, jax.random.PRNGKey(0), x)
  assert {str(l.dtype) for l in jax.tree_util.tree_leaves(b16_abstract)} == {"float32"}
  assert jax.tree_util.tree_structure(b16_abstract) == jax.tree_util.tree_structure(variables)

  ref, ref_tokens = outputs_and_tokens(f32, variables, x)
  got, tokens = outputs_and_tokens(b16, variables, x)
  for key in ("embedding", "logits"):
    assert got[key].dtype == jnp.float32
    assert BF16_MIN_DIFFERENCE < rel(got[key], ref[key]) <= BF16_OUTPUT_RTOL, key
  assert BF16_MIN_DIFFERENCE < rel(tokens, ref_tokens) <= BF16_OUTPUT_RTOL

  loss, grads = loss_and_grads(f32, variables, x, y)
  loss16, grads16 = loss_and_grads(b16, variables, x, y)
  assert {str(g.dtype) for g in jax.tree_util.tree_leaves(grads16)} == {"float32"}
  assert abs(float(loss16 - loss)) <= BF16_LOSS_RTOL * float(loss)
  g, g16 = flat(grads), flat(grads16)
  cosine = BF16_GRAD_COSINE_CONV if name.startswith("resnet") else BF16_GRAD_COSINE
  assert float(g @ g16 / jnp.linalg.norm(g) / jnp.linalg.norm(g16)) >= cosine
  assert abs(float(jnp.linalg.norm(g16) / jnp.linalg.norm(g)) - 1) <= BF16_GRAD_NORM_RTOL


@pytest.fixture(scope="module")
def aptos(module_tmp):
  tmp = module_tmp.mktemp("aptos")
  manual = synthetic.aptos2019(str(tmp / "download"), num_images=24, size=32)
  mdata.build("aptos2019", manual, str(tmp / "data"))
  return manual, str(tmp / "data")


def two_steps(aptos, *overrides):
  manual, data_dir = aptos
  config = load_config("configs/tiny.py:model=deit_base_patch16,dataset=aptos2019,protocol=unfrozen_deit",
                       [f"--config.data.manual_dir={manual}", f"--config.data.data_dir={data_dir}", *overrides])
  run = fit.prepare(config)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, 8), jnp.int32)}
  state, losses = run.state, []
  for _ in range(2):
    state, metrics = run.train_step(state, batch, jnp.float32(1e-3))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_bf16_train_step_keeps_float32_parameters_and_optimizer_state(aptos):
  _, losses = two_steps(aptos)
  state, losses16 = two_steps(aptos, "--config.model.dtype=bfloat16", "--config.optim.mu_dtype=bfloat16")
  dtypes = lambda tree: {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)}
  assert dtypes(state["trainable"]) == {"float32"}
  adam = state["opt"][1]
  assert dtypes(adam.nu) == {"float32"}
  assert dtypes(adam.mu) == {"bfloat16"}  # the optional bf16 first moment
  for loss, loss16 in zip(losses, losses16):
    assert 0 < abs(loss16 - loss) <= BF16_LOSS_RTOL * loss


def test_remat_policies_and_scanned_blocks_compute_the_same():
  plain, res = small("dinov2_vitb14")
  x, y = images(2, res), jnp.array([1, 3])
  variables = init(heads.Classifier(plain, 5), x)
  ref_out = apply(heads.Classifier(plain, 5), variables, x, True)
  ref_loss, ref_grads = loss_and_grads(heads.Classifier(plain, 5), variables, x, y)
  variants = [dict(remat=True, remat_policy=p) for p in layers.REMAT_POLICIES]
  variants += [dict(scan_blocks=True), dict(scan_blocks=True, remat=True, remat_policy="dots"),
               dict(scan_blocks=True, remat=True, remat_policy="attention")]
  for kw in variants:
    classifier = heads.Classifier(small("dinov2_vitb14", **kw)[0], 5)
    out = apply(classifier, variables, x, True)
    assert rel(out["logits"], ref_out["logits"]) <= 1e-5, kw
    assert len(out["foundation_blocks"]) == SMALL["depth"]
    for got, ref in zip(out["foundation_blocks"], ref_out["foundation_blocks"]):
      assert rel(got, ref) <= 1e-5, kw
    loss, grads = loss_and_grads(classifier, variables, x, y)
    assert abs(float(loss - ref_loss)) <= 1e-5 * float(ref_loss), kw
    assert rel(flat(grads), flat(ref_grads)) <= 1e-4, kw


def test_stacked_head_remat_policies_compute_the_same():
  foundation, res = small("deit_base_patch16")
  head = dict(width=64, depth=2, heads=2, mlp_hidden=128, native_grid=(4, 4))
  x, y = images(2, res), jnp.array([0, 4])
  plain = heads.Classifier(foundation, 5, "deit", tuple(sorted(head.items())))
  variables = init(plain, x)
  ref_loss, ref_grads = loss_and_grads(plain, variables, x, y)
  for policy in layers.REMAT_POLICIES:
    fields = dict(head, remat=True, remat_policy=policy)
    loss, grads = loss_and_grads(heads.Classifier(foundation, 5, "deit", tuple(sorted(fields.items()))),
                                 variables, x, y)
    assert abs(float(loss - ref_loss)) <= 1e-5 * float(ref_loss), policy
    assert rel(flat(grads), flat(ref_grads)) <= 1e-4, policy


def test_scanned_blocks_train_with_drop_path_like_the_loop():
  # Blocks with different drop-path rates are not one function: scan_blocks falls back to the loop.
  loop, res = small("deit_base_patch16", drop_path=0.3)
  scanned, _ = small("deit_base_patch16", drop_path=0.3, scan_blocks=True)
  x = images(4, res)
  variables = loop.init(jax.random.PRNGKey(0), x)
  rngs = {"dropout": jax.random.PRNGKey(5)}
  np.testing.assert_array_equal(loop.apply(variables, x, train=True, rngs=rngs)["pooled"],
                                scanned.apply(variables, x, train=True, rngs=rngs)["pooled"])


def test_unknown_remat_policy_names_the_valid_ones():
  model, res = small("deit_base_patch16", remat=True, remat_policy="everything")
  with pytest.raises(ValueError, match="remat_policy 'everything'; valid: block, dots, attention"):
    model.init(jax.random.PRNGKey(0), images(1, res))


@pytest.mark.parametrize("name", ["dinov2_vitb14", "dinov3_vitb16"])
def test_bf16_keeps_the_residual_stream_in_float32(name):
  """As under torch's autocast, where float32 position embeddings, LayerScale gammas and LayerNorm
  outputs make every residual sum float32: LayerScaled updates far below bfloat16's resolution
  against the stream (gammas of 1e-4 here) are kept, not rounded away."""
  foundation, res = small(name)
  x = images(2, res)
  variables = init(foundation, x)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.full_like(v, 1e-4) if "gamma" in jax.tree_util.keystr(path) else v, variables)
  without = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if "gamma" in jax.tree_util.keystr(path) else v, variables)
  # What the blocks add to the stream (the embedding itself is computed in bfloat16, as autocast does).
  update = lambda module: (apply(module, variables, x, True)["blocks"][-1]
                           - apply(module, without, x, True)["blocks"][-1])
  f32, b16 = update(foundation), update(small(name, dtype="bfloat16")[0])
  assert rel(b16, f32) < 0.05, rel(b16, f32)


def test_layer_norm_is_torchs_where_the_mean_dwarfs_the_spread():
  """flax's default variance E[x^2] - E[x]^2 loses it all for a mean of 300 and a spread of 0.1
  (about 370 off); layers.LayerNorm matches torch there, forward and backward. Every model's norms
  are layers.LayerNorm."""
  x = (np.random.default_rng(0).standard_normal((4, 768)) * 0.1 + 300).astype(np.float32)
  norm = layers.LayerNorm(epsilon=1e-6)
  variables = norm.init(jax.random.PRNGKey(0), x)
  ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (768,), eps=1e-6).numpy()
  np.testing.assert_allclose(norm.apply(variables, x), ref, atol=1e-3)
  weights = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
  grad = jax.grad(lambda x: (norm.apply(variables, x) * weights).sum())(x)
  x_torch = torch.from_numpy(x).requires_grad_()
  (torch.nn.functional.layer_norm(x_torch, (768,), eps=1e-6) * torch.from_numpy(weights)).sum().backward()
  np.testing.assert_allclose(grad, x_torch.grad.numpy(), atol=1e-4 * np.abs(x_torch.grad.numpy()).max())
  models_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mfjax", "models")
  plain = [f for f in os.listdir(models_dir) if f.endswith(".py") and "nn.LayerNorm(" in open(
      os.path.join(models_dir, f)).read()]
  assert not plain, f"flax's one-pass LayerNorm in {plain}"


def test_gelu_is_torchs():
  x = np.linspace(-12, 12, 100001, dtype=np.float32)
  ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), ref, rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray(layers.ACTIVATIONS["gelu_erfc"](jnp.asarray(x))), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_bf16_activations_round_once_from_float32(name):
  """bf16 activations are computed in float32 and rounded once (forward and gradient): on CPU the
  bf16 op-by-op form is about 2.5x slower and rounds at every op."""
  act = layers.ACTIVATIONS[name]
  x = jnp.linspace(-6, 6, 4097, dtype=jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
  g = jnp.cos(7 * x)
  out, vjp = jax.vjp(act, x.astype(jnp.bfloat16))
  ref_out, ref_vjp = jax.vjp(act, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out.astype(jnp.bfloat16), np.float32))
  grad, ref_grad = vjp(g.astype(jnp.bfloat16))[0], ref_vjp(g.astype(jnp.bfloat16).astype(jnp.float32))[0]
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(ref_grad.astype(jnp.bfloat16), np.float32))


def test_sam_query_chunked_global_attention_computes_the_same():
  from mfjax.models import sam
  assert [sam.chunk_rows(64, r) for r in (0, 8, 7, 64, 100)] == [64, 8, 4, 64, 64]
  tiny = dict(width=48, depth=2, heads=2, mlp_hidden=96, global_blocks=(1,), window=4, native_resolution=(96, 96))
  plain = models.create("sam_vitb", **tiny)
  chunked = models.create("sam_vitb", **tiny, global_query_chunk_rows=4, remat=True)  # 6 rows -> chunks of 3
  x = images(2, 96)
  variables = init(plain, x)
  variables = jax.tree_util.tree_map(lambda a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(1), a.shape), variables)
  assert_same_tokens_loss_and_grads(chunked, plain, variables, x)


def assert_same_tokens_loss_and_grads(model, reference, variables, x):
  def loss_and_grad(m):
    return jax.jit(jax.value_and_grad(lambda v: (m.apply(v, x)["tokens"] ** 2).mean()))(variables)

  ref_loss, ref_grads = loss_and_grad(reference)
  loss, grads = loss_and_grad(model)
  assert abs(float(loss - ref_loss)) <= 1e-5 * float(ref_loss)
  assert rel(flat(grads), flat(ref_grads)) <= 1e-5


@pytest.mark.parametrize("name,attn_impl", [("deit_base_patch16", None), ("deit_base_patch16", "xla"),
                                            ("dinov3_vitb16", None)])
def test_query_chunked_attention_computes_the_same(name, attn_impl):
  plain, res = small(name, attn_impl=attn_impl)
  chunked, _ = small(name, attn_impl=attn_impl, attn_query_chunk=4)  # 3x3 patches + prefix: a padded last chunk
  x = images(2, res)
  assert_same_tokens_loss_and_grads(chunked, plain, init(plain, x), x)


def test_query_chunked_stacked_deit_head_computes_the_same():
  tokens = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 24)), jnp.float32)
  fields = dict(num_classes=3, width=32, depth=2, heads=2, mlp_hidden=64, native_grid=(2, 2))
  plain, chunked = heads.StackedDeiT(**fields), heads.StackedDeiT(**fields, attn_query_chunk=5)  # 17 tokens
  variables = plain.init(jax.random.PRNGKey(0), tokens, (4, 4))
  grad = lambda head: jax.jit(jax.grad(lambda v: (head.apply(v, tokens, (4, 4))[0] ** 2).sum()))(variables)
  logits = lambda head: jax.jit(lambda v: head.apply(v, tokens, (4, 4))[0])(variables)
  np.testing.assert_allclose(logits(chunked), logits(plain), rtol=1e-5, atol=1e-6)
  assert rel(flat(grad(chunked)), flat(grad(plain))) <= 1e-5


def test_softmax_attention_with_a_bias_matches_dot_product_attention():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 10, 3, 8)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((2, 3, 10, 10)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((2, 10, 3, 8)), jnp.float32)

  def loss(attend):
    return jax.value_and_grad(lambda *a: (attend(*a) * weights).sum(), argnums=(0, 1, 2, 3))(q, k, v, bias)

  with jax.default_matmul_precision("highest"):
    got_loss, got = loss(lambda q, k, v, b: layers.softmax_attention(q, k, v, bias=b))
    ref_loss, ref = loss(lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=b, implementation="xla"))
  assert abs(float(got_loss - ref_loss)) <= 1e-5 * abs(float(ref_loss))
  for name, g, r in zip("qkv", got, ref):
    assert rel(g, r) <= 1e-5, name
  assert rel(got[3], ref[3]) <= 1e-5, "bias"


@pytest.mark.parametrize("cpu_gemm_mode", ["xla", "mkl"])
def test_recomputed_attention_keeps_its_values_and_drops_their_matmul(monkeypatch, cpu_gemm_mode):
  """Query-chunked attention recomputes each chunk's weights in the backward pass but keeps the
  chunk's weights @ v product, so the recomputation runs one (chunk, N) x (N, D) matmul fewer;
  with XLA's dots and with MKL's (mfjax.cpu_gemm, whose calls `cost_flops` adds to XLA's count)."""
  monkeypatch.setenv("MFJAX_CPU_GEMM", cpu_gemm_mode)
  if cpu_gemm_mode == "mkl":
    try:
      cpu_gemm.load()
    except cpu_gemm.Unavailable as e:
      pytest.skip(f"no MKL here: {e}")
  b, n, h, d, chunk = 2, 32, 2, 8, 8
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(3))
  attend = layers.chunk_queries(layers.softmax_attention, chunk)
  grad = lambda: jax.jit(jax.grad(lambda *a: (attend(*a) ** 2).sum(), argnums=(0, 1, 2)))
  flops_and_grads = lambda fn: (common.cost_flops(fn.lower(q, k, v).compile()), fn(q, k, v))
  kept_flops, kept = flops_and_grads(grad())
  monkeypatch.setattr(layers, "recompute_attention", jax.checkpoint)
  plain_flops, plain = flops_and_grads(grad())
  # XLA's cost analysis counts the chunk loop's body once: the difference is one chunk's matmul.
  assert plain_flops - kept_flops == pytest.approx(2 * b * h * chunk * n * d, rel=0.05)
  for got, ref in zip(kept, plain):
    assert rel(got, ref) <= 1e-6


def test_sam_attention_on_cpu_plans_less_memory_than_the_xla_core():
  """SAM's relative-position attention runs the softmax-then-normalise core on CPU (one (heads, N,
  N) tensor fewer than jax.nn.dot_product_attention's XLA path keeps for the backward pass)."""
  from mfjax.models import sam
  x = jnp.ones((1, 32, 32, 64))

  def temp_bytes(attn_impl):
    attn = sam.RelPosAttention(heads=2, table_grid=(64, 64), attn_impl=attn_impl)
    variables = attn.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda v, x: (attn.apply(v, x) ** 2).sum()))
    return grad.lower(variables, x).compile().memory_analysis().temp_size_in_bytes

  one_weights_tensor = 2 * 1024 * 1024 * 4
  assert temp_bytes(None) <= temp_bytes("xla") - 0.9 * one_weights_tensor


def test_a_negative_query_chunk_is_refused():
  with pytest.raises(ValueError, match="attn_query_chunk must be >= 0.*-8"):
    layers.attention_fn(None, -8)


HOST_MEMORY_CYCLE = r"""
import ctypes, resource, sys
from mfjax import hostmem
kept = hostmem.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 256 << 20

def step():  # what XLA:CPU does with a step's temporaries: one large block, written, freed
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_host_memory_is_reused_without_page_faults():
  def faults(keep: str, platforms: str = "cpu"):
    env = {**os.environ, "MFJAX_KEEP_FREED_MEMORY": keep, "JAX_PLATFORMS": platforms}
    out = subprocess.run([sys.executable, "-c", HOST_MEMORY_CYCLE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])
  kept, kept_faults = faults("1")
  default, default_faults = faults("0")
  assert kept and not default
  assert not faults("1", "cuda")[0] and not faults("1", "tpu,cpu")[0]  # the device holds the temporaries there
  # 256 MiB written again: at least one fault per 2 MiB huge page under glibc's defaults (the
  # block went back to the kernel), next to none when the block was kept.
  assert default_faults >= 128, default_faults
  assert kept_faults < 32, kept_faults


def dot_operand_dtypes(compiled_text):
  """The operand dtypes of every dot in compiled HLO text, one set per dot."""
  dtypes = []
  for computation in compiled_text.split("\n\n"):
    dtype_of = dict(re.findall(r"%([\w.-]+) = (\w+)\[", computation))
    for lhs, rhs in re.findall(r" dot\(%([\w.-]+), %([\w.-]+)\)", computation):
      dtypes.append({dtype_of[lhs], dtype_of[rhs]})
  return dtypes


def dense_grads(dot_general):
  def loss(x, w):
    out = dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    return (out.astype(jnp.float32) * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size).sum()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_cpu_bf16_dense_runs_every_gemm_on_bf16_operands(monkeypatch):
  monkeypatch.setenv("MFJAX_CPU_GEMM", "xla")  # float32 through MKL: tests/test_cpu_gemm.py
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 64, 96)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((96, 128)) / 10, jnp.bfloat16)
  fast = dense_grads(layers.dense_dot_general)
  # forward, input gradient and weight gradient: three GEMMs, none on upcast float32 operands
  assert dot_operand_dtypes(fast.lower(x, w).compile().as_text()) == [{"bf16"}] * 3
  default = dot_operand_dtypes(dense_grads(jax.lax.dot_general).lower(x, w).compile().as_text())
  if jax.__version_info__ < (0, 11):   # the reason for the custom VJP: XLA:CPU upcasts the weight gradient's
    assert {"f32"} in default
  else:   # jaxlib 0.11's CPU backend keeps all three in bfloat16 itself (2026-12-06, jax 0.11.2)
    assert default == [{"bf16"}] * 3
  (value, (gx, gw)) = fast(x, w)
  (ref_value, (ref_gx, ref_gw)) = dense_grads(jax.lax.dot_general)(x.astype(jnp.float32), w.astype(jnp.float32))
  assert gx.dtype == gw.dtype == jnp.bfloat16
  assert abs(float(value - ref_value)) <= 1e-2 * abs(float(ref_value))
  assert rel(gx.astype(jnp.float32), ref_gx) <= 1e-2
  assert rel(gw.astype(jnp.float32), ref_gw) <= 1e-2
  # only bf16 Dense contractions take the custom VJP; float32 and batched dots keep lax.dot_general
  jaxpr = jax.make_jaxpr(layers.dense_dot_general, static_argnums=2)
  uses_custom_vjp = lambda *args: "custom_vjp_call" in str(jaxpr(*args))
  assert uses_custom_vjp(x, w, (((2,), (0,)), ((), ())))
  assert not uses_custom_vjp(x.astype(jnp.float32), w.astype(jnp.float32), (((2,), (0,)), ((), ())))
  assert not uses_custom_vjp(x, x, (((2,), (2,)), ((0,), (0,))))


def test_a_bfloat16_moment_is_sharded_like_its_parameter():
  from mfjax import parallel
  # An fsdp axis of 4 (the one CPU device repeated: only the specs are looked at).
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 4).reshape(1, 4), ("data", "fsdp"))
  tree = {"w": jax.ShapeDtypeStruct((1024, 1536), jnp.float32), "mu": jax.ShapeDtypeStruct((1024, 1536), jnp.bfloat16)}
  # 6 MiB in float32, 3 MiB in bfloat16, against a 4 MiB threshold: both sharded the same way.
  shardings = parallel.tree_shardings(tree, [(".*", "fsdp")], mesh, 4 << 20)
  assert shardings["w"].spec == shardings["mu"].spec == jax.sharding.PartitionSpec(None, "fsdp")
