"""mfjax.cpu_gemm: MKL's float32 GEMMs as an XLA custom call, and the layers that use it."""
import ctypes.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from mfjax import cpu_gemm
from mfjax.models import layers


@pytest.fixture
def mkl(monkeypatch):
  """MFJAX_CPU_GEMM=mkl for the test; skipped where no MKL library loads (not an x86 torch)."""
  monkeypatch.setenv("MFJAX_CPU_GEMM", "mkl")
  monkeypatch.delenv("MFJAX_MKL_LIBRARY", raising=False)
  cpu_gemm.reset()
  try:
    cpu_gemm.load()
  except cpu_gemm.Unavailable as e:
    pytest.skip(f"no MKL here: {e}")
  yield
  cpu_gemm.reset()


def torch_library() -> str:
  import torch
  return os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")


def compiled_text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def operands(shape_a, shape_b, seed=0):
  ka, kb = jax.random.split(jax.random.key(seed))
  return jax.random.normal(ka, shape_a), jax.random.normal(kb, shape_b)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_matmul_and_its_gradients_match_xla(mkl, transpose_a, transpose_b, batch):
  m, k, n = 17, 33, 9
  a, b = operands((*batch, k, m) if transpose_a else (*batch, m, k), (*batch, n, k) if transpose_b else (*batch, k, n))
  op = lambda x, t: jnp.swapaxes(x, -1, -2) if t else x
  reference = lambda a, b: op(a, transpose_a) @ op(b, transpose_b)
  ours = lambda a, b: cpu_gemm.matmul(a, b, transpose_a, transpose_b)
  assert cpu_gemm.TARGET in compiled_text(ours, a, b)
  np.testing.assert_allclose(jax.jit(ours)(a, b), reference(a, b), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(a, b)
  want = jax.grad(loss(reference), argnums=(0, 1))(a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_matmul_under_vmap_and_second_order_grad(mkl):
  a, b = operands((4, 6, 5), (5, 3))
  out = jax.vmap(lambda x: cpu_gemm.matmul(x, b))(a)
  np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)
  hvp = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(f(y, b) ** 3))(x)))
  np.testing.assert_allclose(jax.jit(hvp(cpu_gemm.matmul))(a[0]), hvp(jnp.matmul)(a[0]), rtol=1e-4, atol=1e-4)


def test_matmul_names_bad_shapes(mkl):
  a, b = operands((2, 4, 5), (3, 5, 6))
  with pytest.raises(ValueError, match="same batch dimensions"):
    cpu_gemm.matmul(a, b)
  with pytest.raises(ValueError, match="contracting sizes differ"):
    cpu_gemm.matmul(a, b[:2], False, True)


def test_a_fresh_process_calls_matmul_directly_and_an_empty_sum_is_zero(mkl):
  """`matmul` registers the custom call itself (no `load` first), and a product over k = 0 is
  zeros: BLAS refuses a (m, 0) operand's leading dimension and would leave the output unwritten."""
  script = """
import jax, jax.numpy as jnp, numpy as np
from mfjax import cpu_gemm
for shape_a, shape_b, ta, tb in [((3, 0), (0, 4), False, False), ((0, 3), (0, 4), True, False),
                                 ((3, 0), (4, 0), False, True), ((2, 3, 0), (2, 0, 4), False, False)]:
  f = jax.jit(lambda a, b: cpu_gemm.matmul(a, b, ta, tb))
  a, b = jnp.ones(shape_a), jnp.ones(shape_b)
  assert cpu_gemm.TARGET in f.lower(a, b).compile().as_text()
  out = np.asarray(f(a, b))
  print(shape_a, shape_b, out.shape, np.abs(out).max())
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "MFJAX_CPU_GEMM": "mkl"}, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ERROR" not in proc.stdout + proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4 and all(line.endswith(" 0.0") for line in lines), proc.stdout


def test_dense_and_attention_take_mkl_with_the_same_numbers(mkl, monkeypatch):
  """layers.Dense and the softmax attention core (with a bias, as SAM's) run through the custom
  call under MFJAX_CPU_GEMM=mkl and not under xla; outputs and gradients agree."""
  dense = layers.Dense(48)
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  params = dense.init(jax.random.key(1), x)
  q, k, v = (jax.random.normal(key, (2, 11, 3, 16)) for key in jax.random.split(jax.random.key(2), 3))
  bias = jax.random.normal(jax.random.key(3), (1, 3, 11, 11))

  def loss(params, x, q, k, v):
    h = layers.dense(dense.bind(params), x)
    return jnp.sum(h ** 2) + jnp.sum(jnp.cos(layers.softmax_attention(q, k, v, bias)))

  step = lambda: jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
  results, texts = {}, {}
  for mode in ("mkl", "xla"):
    monkeypatch.setenv("MFJAX_CPU_GEMM", mode)
    texts[mode] = compiled_text(step(), params, x, q, k, v)
    results[mode] = jax.jit(step())(params, x, q, k, v)
  # forward, input and weight gradient of the Dense; logits and weights @ v, each with two gradients
  assert texts["mkl"].count(f'custom_call_target="{cpu_gemm.TARGET}"') == 3 + 2 * 3
  assert cpu_gemm.TARGET not in texts["xla"]
  for got, want in zip(jax.tree_util.tree_leaves(results["mkl"]), jax.tree_util.tree_leaves(results["xla"])):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def reference_attention(q, k, v, scale):
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k, precision="highest") * scale
  return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


@pytest.mark.parametrize("batch, queries, keys, heads, dim", [
    ((2,), 197, 197, 3, 16),   # one key block, two query blocks
    ((1,), 300, 600, 2, 8),    # three query and three key blocks, the last ones partial
    ((2, 3), 5, 9, 2, 4),      # two batch dimensions
    ((1,), 1, 1, 1, 4),
])
def test_fused_attention_and_its_gradients_match_softmax(mkl, batch, queries, keys, heads, dim):
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q = 2 * jax.random.normal(kq, (*batch, queries, heads, dim))
  k, v = (jax.random.normal(key, (*batch, keys, heads, dim)) for key in (kk, kv))
  grad = jax.random.normal(kg, q.shape)
  scale = 1.5 / dim ** 0.5
  ours = lambda q, k, v: cpu_gemm.attention(q, k, v, scale)
  assert cpu_gemm.ATTENTION_TARGET in compiled_text(ours, q, k, v)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), reference_attention(q, k, v, scale), rtol=2e-5, atol=2e-5)
  got = jax.jit(lambda *a: jax.vjp(ours, *a[:3])[1](a[3]))(q, k, v, grad)
  want = jax.vjp(lambda *a: reference_attention(*a, scale), q, k, v)[1](grad)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * (1 + float(jnp.abs(w).max())))


def test_fused_attention_under_vmap_and_on_empty_operands(mkl):
  q, k = operands((3, 2, 6, 2, 4), (3, 2, 5, 2, 4))
  ours = lambda q, k: cpu_gemm.attention(q, k, k, 0.5)
  np.testing.assert_allclose(jax.vmap(ours)(q, k), reference_attention(q, k, k, 0.5), rtol=2e-5, atol=2e-5)
  no_keys = jax.jit(ours)(q[0], k[0, :, :0])
  assert no_keys.shape == q[0].shape and not np.any(np.asarray(no_keys))
  assert jax.jit(ours)(q[0, :, :0], k[0]).shape == (2, 0, 2, 4)
  with pytest.raises(ValueError, match="not \\(..., N_q, heads, head_dim\\)"):
    ours(q[0], k[0, ..., :3])


@pytest.mark.parametrize("batch, queries, key_rows, key_cols, heads, dim", [
    (2, 70, 20, 30, 2, 8),    # key blocks of 256 end inside a grid row
    (1, 300, 16, 16, 3, 16),
    (1, 5, 3, 4, 1, 4),
])
def test_fused_attention_with_a_decomposed_bias(mkl, batch, queries, key_rows, key_cols, heads, dim):
  """SAM's relative-position bias, given as its two tables: outputs and the gradients of q, k, v
  and both tables equal a softmax attention with the dense bias."""
  keys = jax.random.split(jax.random.key(1), 6)
  q = jax.random.normal(keys[0], (batch, queries, heads, dim))
  k, v = (jax.random.normal(key, (batch, key_rows * key_cols, heads, dim)) for key in keys[1:3])
  rows = jax.random.normal(keys[3], (batch, heads, queries, key_rows))
  cols = jax.random.normal(keys[4], (batch, heads, queries, key_cols))
  grad = jax.random.normal(keys[5], q.shape)
  scale = dim ** -0.5

  def reference(q, k, v, rows, cols):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
    logits = logits + layers.DecomposedBias(rows, cols).dense()
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")

  ours = lambda q, k, v, rows, cols: cpu_gemm.attention(q, k, v, scale, rows, cols)
  assert cpu_gemm.ATTENTION_BIAS_TARGET in compiled_text(ours, q, k, v, rows, cols)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v, rows, cols), reference(q, k, v, rows, cols),
                             rtol=2e-5, atol=2e-5)
  got = jax.jit(lambda *a: jax.vjp(ours, *a[:5])[1](a[5]))(q, k, v, rows, cols, grad)
  want = jax.vjp(reference, q, k, v, rows, cols)[1](grad)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * (1 + float(jnp.abs(w).max())))
  with pytest.raises(ValueError, match="bias tables"):
    cpu_gemm.attention(q, k, v, scale, rows[..., :-1], cols)
  with pytest.raises(ValueError, match="both bias tables"):
    cpu_gemm.attention(q, k, v, scale, rows)


def test_sam_global_attention_takes_the_fused_core(mkl, monkeypatch):
  """SAM's attention over a grid of more than FUSED_MIN_KEYS tokens runs fused with its
  relative-position tables under mkl, with the outputs and gradients (the tables' included) of
  the dense-bias core."""
  from mfjax.models import sam
  x = jax.random.normal(jax.random.key(0), (1, 17, 17, 64))
  module = sam.RelPosAttention(heads=2, table_grid=(17, 17))
  params = module.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  loss = lambda params, x: jnp.sum(jnp.sin(module.apply(params, x)))
  results = {}
  for mode in ("mkl", "xla"):
    monkeypatch.setenv("MFJAX_CPU_GEMM", mode)
    step = jax.value_and_grad(loss, argnums=(0, 1))
    text = compiled_text(step, params, x)
    assert (cpu_gemm.ATTENTION_BIAS_GRAD_TARGET in text) == (mode == "mkl")
    results[mode] = jax.jit(step)(params, x)
  for got, want in zip(jax.tree_util.tree_leaves(results["mkl"]), jax.tree_util.tree_leaves(results["xla"])):
    np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-5 * (1 + float(jnp.abs(want).max())))


def test_softmax_attention_takes_the_fused_core_without_a_bias(mkl, monkeypatch):
  """The softmax core runs fused (one call forward, one backward) when it has no bias, also
  query-chunked with recomputation, and keeps the two matmul calls with a bias (SAM's)."""
  q, k, v = (jax.random.normal(key, (2, 300, 2, 16)) for key in jax.random.split(jax.random.key(0), 3))
  loss = lambda core: lambda q, k, v: jnp.sum(jnp.sin(core(q, k, v)))
  results = {}
  for mode in ("mkl", "xla"):
    monkeypatch.setenv("MFJAX_CPU_GEMM", mode)
    # built anew per mode: jax.checkpoint caches its trace per function, which fixes the path
    fresh = lambda q, k, v: layers.softmax_attention(q, k, v)
    cores = {"plain": layers.softmax_attention, "chunked": layers.chunk_queries(fresh, 128),
             "bias": lambda q, k, v: layers.softmax_attention(q, k, v, jnp.zeros((1, 2, 300, 300)))}
    for name, core in cores.items():
      step = jax.value_and_grad(loss(core), argnums=(0, 1, 2))
      text = compiled_text(step, q, k, v)
      results[mode, name] = jax.jit(step)(q, k, v)
      fused = text.count(f'custom_call_target="{cpu_gemm.ATTENTION_TARGET}"')
      fused_grad = text.count(f'custom_call_target="{cpu_gemm.ATTENTION_GRAD_TARGET}"')
      if mode == "xla":
        assert fused == fused_grad == 0
      elif name == "bias":
        assert fused == fused_grad == 0 and cpu_gemm.TARGET in text
      else:
        assert fused >= 1 and fused_grad == 1, (name, fused, fused_grad)
  for name in cores:
    got_leaves, want_leaves = (jax.tree_util.tree_leaves(results[mode, name]) for mode in ("mkl", "xla"))
    for got, want in zip(got_leaves, want_leaves):
      np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-5)


def test_bf16_keeps_its_own_path(mkl):
  dense = layers.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  x = jnp.ones((4, 16), jnp.bfloat16)
  params = dense.init(jax.random.key(0), x)
  assert cpu_gemm.TARGET not in compiled_text(lambda p, x: dense.apply(p, x), params, x)


def test_benchmark_flops_count_the_custom_calls(mkl, monkeypatch):
  a, b = operands((4, 64, 32), (4, 32, 48))
  f = lambda a, b: jnp.tanh(cpu_gemm.matmul(a, b)) @ jnp.ones((48, 8))
  flops = {}
  for mode in ("mkl", "xla"):
    monkeypatch.setenv("MFJAX_CPU_GEMM", mode)
    fn = f if mode == "mkl" else (lambda a, b: jnp.tanh(a @ b) @ jnp.ones((48, 8)))
    flops[mode] = common.cost_flops(jax.jit(fn).lower(a, b).compile())
  assert cpu_gemm.custom_call_flops(compiled_text(f, a, b)) == 2 * 4 * 64 * 32 * 48
  assert flops["mkl"] == pytest.approx(flops["xla"], rel=1e-3)

  # the fused attention counts as the unfused core: forward 2 matmuls, backward 4
  q, k = operands((2, 40, 3, 8), (2, 24, 3, 8))
  step = lambda core: lambda q, k, g: jax.vjp(lambda q, k: core(q, k, k), q, k)[1](g)
  monkeypatch.setenv("MFJAX_CPU_GEMM", "xla")
  flops["xla"] = common.cost_flops(jax.jit(step(layers.softmax_attention)).lower(q, k, q).compile())
  attention_step = step(lambda q, k, v: cpu_gemm.attention(q, k, v, 0.5))
  flops["mkl"] = common.cost_flops(jax.jit(attention_step).lower(q, k, q).compile())
  text = compiled_text(attention_step, q, k, q)
  assert cpu_gemm.ATTENTION_GRAD_TARGET in text
  assert cpu_gemm.custom_call_flops(text) == 6 * 2 * 2 * 3 * 40 * 24 * 8
  assert flops["mkl"] == pytest.approx(flops["xla"], rel=0.1)  # XLA also counts the softmax's exp, max, sum


def test_library_from_the_environment(mkl, monkeypatch):
  monkeypatch.setenv("MFJAX_MKL_LIBRARY", torch_library())
  cpu_gemm.reset()
  assert cpu_gemm.load() == torch_library()
  assert cpu_gemm.describe() == f"mkl (MKL from {torch_library()})"
  a, b = operands((5, 6), (6, 7))
  np.testing.assert_allclose(jax.jit(cpu_gemm.matmul)(a, b), a @ b, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_named(mkl, monkeypatch, tmp_path):
  monkeypatch.setenv("MFJAX_CPU_GEMM", "mlk")
  with pytest.raises(ValueError, match="MFJAX_CPU_GEMM='mlk' is not one of auto, mkl, xla"):
    cpu_gemm.enabled_for(jnp.ones(2))

  not_mkl = ctypes.util.find_library("m")
  for library, reason in ((str(tmp_path / "libmissing.so"), "libmissing.so does not load"), (not_mkl, "exports no sgemm_")):
    monkeypatch.setenv("MFJAX_MKL_LIBRARY", library)
    cpu_gemm.reset()
    monkeypatch.setenv("MFJAX_CPU_GEMM", "mkl")
    with pytest.raises(cpu_gemm.Unavailable, match=reason):
      cpu_gemm.enabled_for(jnp.ones(2))
    monkeypatch.setenv("MFJAX_CPU_GEMM", "auto")
    use, why = cpu_gemm.decision()
    assert not use and (reason in why or "not an Intel CPU" in why)
    assert not cpu_gemm.enabled_for(jnp.ones(2))

  monkeypatch.setenv("MFJAX_CPU_GEMM", "mkl")
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  with pytest.raises(ValueError, match="single CPU device; this process has 2"):
    cpu_gemm.enabled_for(jnp.ones(2))
  monkeypatch.setenv("MFJAX_CPU_GEMM", "auto")
  assert cpu_gemm.decision() == (False, "2 CPU devices (the custom call has no sharding rule)")


def test_a_failed_build_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv("MFJAX_NATIVE_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "/bin/false")
  with pytest.raises(cpu_gemm.Unavailable, match="compiling .*cpu_gemm.cc failed"):
    cpu_gemm.build()
  assert not list(tmp_path.iterdir())


def test_a_compiler_that_cannot_run_and_a_shared_cache_folder_are_named(monkeypatch, tmp_path):
  monkeypatch.setenv("MFJAX_NATIVE_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "ccache-not-installed g++")  # CXX with arguments is split, as a shell would
  with pytest.raises(cpu_gemm.Unavailable, match=r"cannot run the compiler \(ccache-not-installed g\+\+\)"):
    cpu_gemm.build()
  # Without a writable cache, the fallback under the temporary folder must be this user's alone.
  monkeypatch.setenv("MFJAX_NATIVE_CACHE", "/proc/not-writable")
  monkeypatch.setattr(cpu_gemm.tempfile, "gettempdir", lambda: str(tmp_path))
  shared = tmp_path / f"mfjax-native-{os.getuid()}"
  shared.mkdir()
  shared.chmod(0o777)
  with pytest.raises(cpu_gemm.Unavailable, match="is not a private folder of this user"):
    cpu_gemm.cache_dir()
  shared.chmod(0o700)
  assert cpu_gemm.cache_dir() == str(shared)
  assert cpu_gemm.describe("bfloat16") == "xla (bfloat16 compute)"


def test_the_build_is_cached(monkeypatch, tmp_path):
  monkeypatch.setenv("MFJAX_NATIVE_CACHE", str(tmp_path))
  monkeypatch.delenv("CXX", raising=False)
  try:
    first = cpu_gemm.build()
  except cpu_gemm.Unavailable as e:
    pytest.skip(str(e))
  assert os.path.dirname(first) == str(tmp_path) and cpu_gemm.build() == first
  assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first)]


def test_a_missing_library_is_looked_for_once(monkeypatch, tmp_path):
  """Every layer asks at trace time: a failed load is remembered, not retried per layer."""
  missing = str(tmp_path / "libnone.so")
  monkeypatch.setenv("MFJAX_MKL_LIBRARY", missing)
  calls, real = [], cpu_gemm._blas_functions
  monkeypatch.setattr(cpu_gemm, "_blas_functions", lambda path: calls.append(path) or real(path))
  cpu_gemm.reset()
  try:
    for _ in range(3):
      with pytest.raises(cpu_gemm.Unavailable, match="libnone.so does not load"):
        cpu_gemm.load()
    assert calls == [missing]
  finally:
    cpu_gemm.reset()


def test_a_load_that_fails_otherwise_is_unavailable_once(monkeypatch):
  """A full disk, a missing symbol or a failed registration while loading is a reason to use XLA's
  GEMMs (remembered, as any other), not an error at every layer's trace."""
  calls = []

  def full_disk():
    calls.append(1)
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(cpu_gemm, "_load", full_disk)
  cpu_gemm.reset()
  try:
    for _ in range(2):
      with pytest.raises(cpu_gemm.Unavailable, match="loading mfjax/cpu_gemm.cc's library failed: OSError"):
        cpu_gemm.load()
    assert calls == [1]
  finally:
    cpu_gemm.reset()


def test_an_empty_dense_input_takes_xla(mkl, monkeypatch):
  monkeypatch.setenv("MFJAX_CPU_GEMM", "mkl")
  out = layers.dense_dot_general(jnp.zeros((3, 0)), jnp.zeros((0, 4)), (((1,), (0,)), ((), ())))
  np.testing.assert_array_equal(out, np.zeros((3, 4)))


def test_library_search_order(mkl, monkeypatch, tmp_path):
  """$MFJAX_MKL_LIBRARY alone when set; else the `mkl` wheel's libmkl_rt in the environment's lib
  folder (here a link to torch's MKL build standing in for it), then torch's libtorch_cpu.so."""
  (tmp_path / "lib").mkdir()
  wheel_library = tmp_path / "lib" / "libmkl_rt.so.3"
  wheel_library.symlink_to(torch_library())
  monkeypatch.setattr(sys, "prefix", str(tmp_path))
  assert cpu_gemm.mkl_library_candidates() == [str(wheel_library), torch_library()]
  cpu_gemm.reset()
  assert cpu_gemm.load() == str(wheel_library)
  monkeypatch.setenv("MFJAX_MKL_LIBRARY", "/elsewhere/libmkl_rt.so.2")
  assert cpu_gemm.mkl_library_candidates() == ["/elsewhere/libmkl_rt.so.2"]


def test_remat_dots_keeps_the_mkl_matmul_outputs(mkl):
  """remat_policy=dots keeps matmul outputs; MKL's are a custom call, which the dots policy alone cannot
  see: without the name they were recomputed, as under a policy that keeps nothing."""
  dense = layers.Dense(6)
  x = jnp.ones((4, 5))
  params = dense.init(jax.random.key(0), x)

  def calls(policy):
    loss = jax.checkpoint(lambda p, x: jnp.sum(jnp.tanh(dense.apply(p, x))), policy=policy)
    return str(jax.make_jaxpr(jax.grad(loss))(params, x)).count(cpu_gemm.TARGET)

  assert calls(layers.DOTS_SAVEABLE) == 3 and calls(None) == 4  # forward once; input and weight gradients
  assert calls(jax.checkpoint_policies.dots_with_no_batch_dims_saveable) == 4
