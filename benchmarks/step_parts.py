r"""The parts of a ViT train step timed alone, JAX next to torch in the same run: where a step's
time goes and which part makes the difference between the frameworks.

  PYTHONPATH=. python -m benchmarks.step_parts --width 768 --depth 12 --heads 12 --tokens 197 --batch 8

Parts (float32 unless --dtype bfloat16), each with the number of times one step runs it:
- the four dense layers (qkv, proj, fc1, fc2) in the three matmul layouts of a step: forward
  `x @ W`, input gradient `dy @ W^T`, weight gradient `x^T @ dy` (XLA sends the last to a
  different GEMM path than the first two on CPU). `--dense mfjax` (default) times the GEMMs
  `layers.Dense` runs: in bf16 on CPU its float32-accumulated forms (`layers.bf16_gemm_*`), in
  float32 MKL's (`mfjax.cpu_gemm`) where MFJAX_CPU_GEMM picks it;
  `--dense lax` times `lax.dot_general` as a plain Flax Dense and its autodiff run them;
- the attention core, forward and backward: mfjax's (`layers.attention_fn(None)`: on CPU the
  softmax-then-normalise core, its matmuls in MKL where `layers.Dense` uses it, and beyond
  `layers.FUSED_MIN_KEYS` keys MKL's fused attention there) against torch's
  `scaled_dot_product_attention`;
- GELU (erf form), forward and backward;
- the optimizer: gradient clipping at norm 1.0 and AdamW over ViT-shaped parameters (mfjax's
  optax chain against torch's fused AdamW), once per step.
The last row sums the parts; a whole step also runs LayerNorms, residual adds and the head.
Timings are taken in turns (JAX, torch, JAX, ...), medians of --rounds after a warm-up. On a
CPU, "cores busy" is the process's CPU time per wall second while the part ran: a part near 1.0
on a multi-core host ran on one thread (XLA:CPU's YNNPACK batched dots of the attention core at
197 tokens do; at 512 tokens they use both cores of the 2-core container).
"""
import argparse
import sys

import numpy as np

from benchmarks import common

common.prepare_process()

COLUMNS = [("device", "device"), ("part", "part"), ("shape", "shape"), ("per step", "per_step"),
           ("GFLOP", "gflop"), ("JAX ms", "jax_ms"), ("torch ms", "torch_ms"), ("JAX / torch speed", "ratio"),
           ("JAX GFLOP/s", "jax_gflop_s"), ("torch GFLOP/s", "torch_gflop_s"),
           ("JAX cores busy", "jax_busy"), ("torch cores busy", "torch_busy"),
           ("JAX ms / step", "jax_step_ms"), ("torch ms / step", "torch_step_ms")]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--depth", type=int, default=12)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--tokens", type=int, default=197, help="tokens per image (196 patches + class token)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--mlp-ratio", type=int, default=4)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--dense", default="mfjax", choices=["mfjax", "lax"],
                      help="the dense GEMMs JAX runs: layers.Dense's (mfjax) or plain lax.dot_general's (lax)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--min-seconds", type=float, default=0.3, help="shortest single timing (calls repeat)")
  parser.add_argument("--out", default=None, help="append the JSON rows to this file")
  args, _ = common.parse_args(parser, argv)
  return args


def parts(args):
  """(name, shape, per step, FLOPs, jax_fn, torch_fn) for every part; each fn returns when done."""
  import jax
  import jax.numpy as jnp
  import optax
  import torch
  import torch.nn.functional as F
  from mfjax import cpu_gemm
  from mfjax.models import layers
  from mfjax.train import optim

  device = common.torch_device()
  rows, d, h = args.batch * args.tokens, args.width, args.width * args.mlp_ratio
  rng = np.random.default_rng(0)
  jdtype, tdtype = jnp.dtype(args.dtype), getattr(torch, args.dtype)

  def arrays(*shapes):
    host = [rng.standard_normal(s, np.float32) for s in shapes]
    return ([jnp.asarray(a, jdtype) for a in host],
            [torch.from_numpy(a).to(device=device, dtype=tdtype) for a in host])

  def jax_call(fn, *xs):
    compiled = jax.jit(fn)
    return lambda: jax.block_until_ready(compiled(*xs))

  def torch_call(fn):
    def run():
      fn()
      common.torch_sync(device)
    return run

  plain_forms = (lambda x, w: x @ w,
                 lambda g, w: jax.lax.dot_general(g, w, (((1,), (1,)), ((), ()))),
                 lambda x, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ()))))
  mkl_forms = (cpu_gemm.matmul, lambda g, w: cpu_gemm.matmul(g, w, False, True),
               lambda x, g: cpu_gemm.matmul(x, g, True, False))
  mfjax_bf16 = args.dense == "mfjax" and args.dtype == "bfloat16" and jax.default_backend() == "cpu"
  mfjax_mkl = args.dense == "mfjax" and cpu_gemm.enabled_for(jnp.zeros((), jdtype))
  forward, grad_input, grad_weight = ((layers.bf16_gemm_forward, layers.bf16_gemm_grad_input,
                                       layers.bf16_gemm_grad_weight) if mfjax_bf16
                                      else mkl_forms if mfjax_mkl else plain_forms)
  out = []
  for layer, (n_in, n_out) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, h), "fc2": (h, d)}.items():
    (jx, jw, jdy), (tx, tw, tdy) = arrays((rows, n_in), (n_in, n_out), (rows, n_out))
    flops = 2.0 * rows * n_in * n_out
    out += [
        (f"{layer} forward x @ W", f"{rows}x{n_in} @ {n_in}x{n_out}", args.depth, flops,
         jax_call(forward, jx, jw), torch_call(lambda tx=tx, tw=tw: tx @ tw)),
        (f"{layer} input grad dy @ W^T", f"{rows}x{n_out} @ ({n_in}x{n_out})^T", args.depth, flops,
         jax_call(grad_input, jdy, jw), torch_call(lambda tdy=tdy, tw=tw: tdy @ tw.t())),
        (f"{layer} weight grad x^T @ dy", f"({rows}x{n_in})^T @ {rows}x{n_out}", args.depth, flops,
         jax_call(grad_weight, jx, jdy), torch_call(lambda tx=tx, tdy=tdy: tx.t() @ tdy)),
    ]

  head_dim = d // args.heads
  shape = (args.batch, args.tokens, args.heads, head_dim)
  (jq, jk, jv, jg), (tq, tk, tv, tg) = arrays(shape, shape, shape, shape)
  core = layers.attention_fn(None)
  tq, tk, tv, tg = (t.transpose(1, 2).contiguous() for t in (tq, tk, tv, tg))  # torch: (B, H, N, D)
  for t in (tq, tk, tv):
    t.requires_grad_(True)

  def torch_attention(tq=tq, tk=tk, tv=tv, tg=tg):
    torch.autograd.grad(F.scaled_dot_product_attention(tq, tk, tv), (tq, tk, tv), tg)

  out.append(("attention core, forward + backward", f"{args.batch}x{args.heads}x{args.tokens}x{head_dim}",
              args.depth, 3 * 4.0 * args.batch * args.heads * args.tokens ** 2 * head_dim,
              jax_call(lambda q, k, v, g: jax.vjp(core, q, k, v)[1](g), jq, jk, jv, jg),
              torch_call(torch_attention)))

  (jx, jg), (tx_gelu, tg_gelu) = arrays((rows, h), (rows, h))
  tx_gelu.requires_grad_(True)
  out.append(("GELU (erf), forward + backward", f"{rows}x{h}", args.depth, None,
              jax_call(lambda x, g: jax.vjp(layers.gelu, x)[1](g), jx, jg),
              torch_call(lambda: torch.autograd.grad(F.gelu(tx_gelu), tx_gelu, tg_gelu))))

  block = [(d, 3 * d), (3 * d,), (d, d), (d,), (d, h), (h,), (h, d), (d,), (d,), (d,), (d,), (d,)]
  shapes = block * args.depth
  params = {f"p{i:03d}": jnp.asarray(rng.standard_normal(s, np.float32)) for i, s in enumerate(shapes)}
  grads = jax.tree.map(lambda p: p * 0.01, params)
  tx_opt = optim.make_optimizer(params)

  def update(params, opt_state, grads):
    updates, opt_state = tx_opt.update(grads, opt_state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: -1e-4 * u, updates)), opt_state

  update = jax.jit(update, donate_argnums=(0, 1))
  holder = {"params": params, "opt": tx_opt.init(params)}

  def jax_optimizer():
    holder["params"], holder["opt"] = update(holder["params"], holder["opt"], grads)
    jax.block_until_ready(holder["params"])

  torch_params = [torch.nn.Parameter(torch.from_numpy(np.asarray(p)).to(device)) for p in params.values()]
  for p in torch_params:
    p.grad = p.detach() * 0.01
  torch_opt = torch.optim.AdamW(torch_params, lr=1e-4, weight_decay=1e-5, fused=True)

  def torch_optimizer():
    torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
    torch_opt.step()

  n_params = sum(int(np.prod(s)) for s in shapes)
  out.append(("clip + AdamW update", f"{n_params / 1e6:.1f}M parameters", 1, None, jax_optimizer,
              torch_call(torch_optimizer)))
  return out


def main(argv=None):
  args = parse_args(argv)
  import torch
  if common.torch_device() == "cpu":
    torch.set_num_threads(common.cpu_cores())
  env = common.environment()
  device_is_cpu = common.torch_device() == "cpu"
  table, fns, calls = parts(args), {}, {}
  for i, (_, _, _, _, jax_fn, torch_fn) in enumerate(table):
    for side, fn in (("jax", jax_fn), ("torch", torch_fn)):
      fns[f"{i}:{side}"] = fn
      calls[f"{i}:{side}"] = common.warm_up(fn, 2, args.min_seconds)
  busy = {}
  times = common.interleave(fns, args.rounds, calls, busy)
  median = {k: float(np.median(v)) for k, v in times.items()}
  cores = {k: common.fmt(float(np.median(v)) if device_is_cpu else None, ".2f") for k, v in busy.items()}

  rows, totals = [], {"jax": 0.0, "torch": 0.0}
  for i, (name, shape, per_step, flops, _, _) in enumerate(table):
    jax_s, torch_s = median[f"{i}:jax"], median[f"{i}:torch"]
    totals["jax"] += jax_s * per_step
    totals["torch"] += torch_s * per_step
    rows.append({
        "benchmark": "step_parts", "device": env["device"], "part": name, "shape": shape, "per_step": per_step,
        "gflop": common.fmt(flops / 1e9 if flops else None, ".2f"), "jax_ms": common.fmt(jax_s * 1e3, ".3g"),
        "torch_ms": common.fmt(torch_s * 1e3, ".3g"), "ratio": common.fmt(torch_s / jax_s),
        "jax_gflop_s": common.fmt(flops / jax_s / 1e9 if flops else None, ".0f"),
        "torch_gflop_s": common.fmt(flops / torch_s / 1e9 if flops else None, ".0f"),
        "jax_busy": cores[f"{i}:jax"], "torch_busy": cores[f"{i}:torch"],
        "jax_step_ms": common.fmt(jax_s * per_step * 1e3, ".0f"),
        "torch_step_ms": common.fmt(torch_s * per_step * 1e3, ".0f"),
        "timings_s": {"jax": common.summary(times[f"{i}:jax"]), "torch": common.summary(times[f"{i}:torch"])},
        "dtype": args.dtype, "dense": args.dense, **env,
    })
  rows.append({"benchmark": "step_parts", "device": env["device"], "part": "sum of the parts", "shape": "",
               "per_step": "", "ratio": common.fmt(totals["torch"] / totals["jax"]),
               "jax_step_ms": common.fmt(totals["jax"] * 1e3, ".0f"),
               "torch_step_ms": common.fmt(totals["torch"] * 1e3, ".0f"), "dtype": args.dtype, "dense": args.dense,
               "command": "python -m benchmarks.step_parts " + " ".join(argv if argv is not None else sys.argv[1:]),
               **env})
  common.emit(rows, COLUMNS, args.out)
  return rows


if __name__ == "__main__":
  main()
