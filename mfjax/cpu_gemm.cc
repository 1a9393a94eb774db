// mfjax's float32 CPU GEMM: an XLA FFI handler that runs out[..., M, N] = op(a) @ op(b) through
// MKL's sgemm_ (one matrix) or sgemm_batch_ (a batch of them), and a fused softmax attention
// (forward and backward) built on sgemm_ over blocks of queries and keys. mfjax/cpu_gemm.py
// compiles this file, loads the MKL library and hands its functions over with
// MfjaxCpuGemmSetBlas.
//
// Operands are row-major with the same leading (batch) dimensions; op() transposes the last two
// dimensions when transpose_a / transpose_b is set. MKL is column-major, so the row-major
// product out = op(a) op(b) is computed as the column-major out^T = op(b)^T op(a)^T.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);
using SgemmBatch = void (*)(const char*, const char*, const int*, const int*, const int*,
                            const float*, const float**, const int*, const float**, const int*,
                            const float*, float**, const int*, const int*, const int*);

using SetThreadsLocal = int (*)(int);
using GetMaxThreads = int (*)();

static Sgemm sgemm = nullptr;
static SgemmBatch sgemm_batch = nullptr;
static SetThreadsLocal mkl_set_num_threads_local = nullptr;
static GetMaxThreads mkl_get_max_threads = nullptr;

extern "C" void MfjaxCpuGemmSetBlas(void* sgemm_fn, void* sgemm_batch_fn, void* set_threads_local_fn,
                                    void* get_max_threads_fn) {
  sgemm = reinterpret_cast<Sgemm>(sgemm_fn);
  sgemm_batch = reinterpret_cast<SgemmBatch>(sgemm_batch_fn);
  mkl_set_num_threads_local = reinterpret_cast<SetThreadsLocal>(set_threads_local_fn);
  mkl_get_max_threads = reinterpret_cast<GetMaxThreads>(get_max_threads_fn);
}

static std::string Shape(ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

static ffi::Error GemmImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                           ffi::ResultBuffer<ffi::F32> out, bool transpose_a, bool transpose_b) {
  if (sgemm == nullptr || sgemm_batch == nullptr)
    return ffi::Error::Internal("mfjax_cpu_gemm: no MKL library loaded (mfjax.cpu_gemm.load)");
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  const size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank || od.size() != rank)
    return ffi::Error::InvalidArgument("mfjax_cpu_gemm: operands " + Shape(ad) + " and " + Shape(bd) +
                                       " need the same rank >= 2");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != bd[i] || ad[i] != od[i])
      return ffi::Error::InvalidArgument("mfjax_cpu_gemm: batch dimensions differ: " + Shape(ad) + " and " +
                                         Shape(bd));
    batch *= ad[i];
  }
  const int64_t m = transpose_a ? ad[rank - 1] : ad[rank - 2];
  const int64_t k = transpose_a ? ad[rank - 2] : ad[rank - 1];
  const int64_t n = transpose_b ? bd[rank - 2] : bd[rank - 1];
  const int64_t k_b = transpose_b ? bd[rank - 1] : bd[rank - 2];
  if (k != k_b || od[rank - 2] != m || od[rank - 1] != n)
    return ffi::Error::InvalidArgument("mfjax_cpu_gemm: shapes " + Shape(ad) + " and " + Shape(bd) +
                                       " do not multiply into " + Shape(od));
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  if (m > kMaxInt || n > kMaxInt || k > kMaxInt || batch > kMaxInt || ad[rank - 1] > kMaxInt ||
      bd[rank - 1] > kMaxInt)
    return ffi::Error::InvalidArgument("mfjax_cpu_gemm: dimensions beyond 32-bit BLAS indices");
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum; BLAS would refuse the leading dimension of a (m, 0) operand
    std::fill(out->typed_data(), out->typed_data() + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }

  const int mi = m, ni = n, ki = k, lda = ad[rank - 1], ldb = bd[rank - 1], ldc = n;
  const char op_b = transpose_b ? 'T' : 'N', op_a = transpose_a ? 'T' : 'N';
  const float one = 1.0f, zero = 0.0f;
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* out_data = out->typed_data();
  if (batch == 1) {
    sgemm(&op_b, &op_a, &ni, &mi, &ki, &one, b_data, &ldb, a_data, &lda, &zero, out_data, &ldc);
    return ffi::Error::Success();
  }
  const int64_t a_step = ad[rank - 2] * ad[rank - 1], b_step = bd[rank - 2] * bd[rank - 1], out_step = m * n;
  std::vector<const float*> a_ptrs(batch), b_ptrs(batch);
  std::vector<float*> out_ptrs(batch);
  for (int64_t i = 0; i < batch; ++i) {
    a_ptrs[i] = a_data + i * a_step;
    b_ptrs[i] = b_data + i * b_step;
    out_ptrs[i] = out_data + i * out_step;
  }
  const int groups = 1, group_size = batch;
  sgemm_batch(&op_b, &op_a, &ni, &mi, &ki, &one, b_ptrs.data(), &ldb, a_ptrs.data(), &lda, &zero,
              out_ptrs.data(), &ldc, &groups, &group_size);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfjaxCpuGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

// ---------------------------------------------------------------------------------------------
// Fused softmax attention: out = softmax(scale q k^T) v per (batch, head), on (..., N, H, D)
// row-major operands as the models hold them (a head's rows are H*D floats apart), without the
// (N_q, N_k) weights in memory: blocks of kQueryBlock queries against blocks of kKeyBlock keys,
// an online softmax in the forward pass and the weights recomputed from the saved log-sum-exp in
// the backward pass. The work is split over threads (MKL's thread count), each running MKL
// single-threaded on its own blocks.

// Block sizes: the fastest of 64/128/256 x 256/512 at 1370 tokens on a 2-core Xeon (2026-12-06).
constexpr int kQueryBlock = 128;
constexpr int kKeyBlock = 256;

// Row-major C (m x n) = alpha op(a) op(b) + beta C, through the column-major sgemm_.
static void GemmRowMajor(bool transpose_a, bool transpose_b, int m, int n, int k, float alpha, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  const char op_a = transpose_a ? 'T' : 'N', op_b = transpose_b ? 'T' : 'N';
  sgemm(&op_b, &op_a, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// exp(x) to about 2 ulp, in a form the compiler vectorises (Cephes' expf polynomial; the rounding
// by adding and subtracting 1.5 * 2^23 because std::floor keeps GCC from vectorising the loop).
static inline float FastExp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The softmax's row loops, written for the vectoriser (built with -fopenmp-simd).
static float RowMax(const float* __restrict x, int n, float init) {
  float m = init;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// x = exp(x - shift) in place; returns the sum.
static float ExpInPlace(float* __restrict x, int n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < n; ++i) {
    x[i] = FastExp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// This thread's scratch memory of at least n floats, kept from call to call (the units of a call
// reuse it instead of each allocating its own).
static float* Scratch(size_t n) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < n) scratch.resize(n);
  return scratch.data();
}

static int MaxThreads() { return mkl_get_max_threads ? std::max(1, mkl_get_max_threads()) : 1; }

// Runs work(unit) for unit in [0, units) on up to MKL's thread count of threads (the caller's
// among them), each with MKL single-threaded. A thread that cannot be started leaves its share
// to the others.
template <typename Work>
static void ParallelFor(int64_t units, Work work) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(MaxThreads(), units)));
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    const int previous = mkl_set_num_threads_local(1);
    for (int64_t unit = next++; unit < units; unit = next++) work(unit);
    mkl_set_num_threads_local(previous);
  };
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  } catch (const std::system_error&) {
  }
  worker();
  for (auto& thread : pool) thread.join();
}

struct AttentionShape {
  int64_t batch, queries, keys, heads, dim;
};

static ffi::Error AttentionShapeOf(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                                   ffi::Span<const int64_t> vd, AttentionShape* shape) {
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank)
    return ffi::Error::InvalidArgument("mfjax_cpu_attention: q " + Shape(qd) + ", k " + Shape(kd) + ", v " +
                                       Shape(vd) + " need the same rank >= 3: (..., N, heads, head_dim)");
  int64_t batch = 1;
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (qd[i] != kd[i] || qd[i] != vd[i])
      return ffi::Error::InvalidArgument("mfjax_cpu_attention: batch dimensions differ: " + Shape(qd) + ", " +
                                         Shape(kd) + ", " + Shape(vd));
    batch *= qd[i];
  }
  for (size_t i = rank - 3; i < rank; ++i)
    if (kd[i] != vd[i] || (i > rank - 3 && qd[i] != kd[i]))
      return ffi::Error::InvalidArgument("mfjax_cpu_attention: q " + Shape(qd) + ", k " + Shape(kd) + ", v " +
                                         Shape(vd) + " do not attend");
  *shape = {batch, qd[rank - 3], kd[rank - 3], qd[rank - 2], qd[rank - 1]};
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  if (shape->heads * shape->dim > kMaxInt || shape->keys > kMaxInt || shape->queries > kMaxInt)
    return ffi::Error::InvalidArgument("mfjax_cpu_attention: dimensions beyond 32-bit BLAS indices");
  if (sgemm == nullptr || mkl_set_num_threads_local == nullptr)
    return ffi::Error::Internal("mfjax_cpu_attention: no MKL library loaded (mfjax.cpu_gemm.load)");
  return ffi::Error::Success();
}

// SAM's decomposed relative-position bias: bias[query, key] = rows[query, key / width] +
// cols[query, key % width], for keys on a (height, width) grid. One query's logits over the keys
// [first, first + count) get it added; its gradient is summed back into the two tables.
struct DecomposedBias {
  const float* rows = nullptr;  // (..., heads, queries, height), or null: no bias
  const float* cols = nullptr;  // (..., heads, queries, width)
  float* grad_rows = nullptr;
  float* grad_cols = nullptr;
  int64_t height = 0, width = 0;
};

template <typename Segment>
static void ForKeyRows(int64_t first, int count, int64_t width, Segment segment) {
  for (int c = 0; c < count;) {  // segment(offset in the block, key row, first key column, length)
    const int64_t key = first + c, column = key % width;
    const int length = static_cast<int>(std::min<int64_t>(count - c, width - column));
    segment(c, key / width, column, length);
    c += length;
  }
}

static void AddBias(const DecomposedBias& bias, int64_t head_query, float* logits, int64_t first, int count) {
  const float* rows = bias.rows + head_query * bias.height;
  const float* cols = bias.cols + head_query * bias.width;
  ForKeyRows(first, count, bias.width, [&](int c, int64_t key_row, int64_t column, int length) {
    const float row = rows[key_row];
    float* __restrict s = logits + c;
    const float* __restrict w = cols + column;
#pragma omp simd
    for (int j = 0; j < length; ++j) s[j] += row + w[j];
  });
}

static void AccumulateBiasGrad(const DecomposedBias& bias, int64_t head_query, const float* grad_logits,
                               int64_t first, int count) {
  float* rows = bias.grad_rows + head_query * bias.height;
  float* cols = bias.grad_cols + head_query * bias.width;
  ForKeyRows(first, count, bias.width, [&](int c, int64_t key_row, int64_t column, int length) {
    const float* __restrict g = grad_logits + c;
    float* __restrict w = cols + column;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < length; ++j) {
      w[j] += g[j];
      sum += g[j];
    }
    rows[key_row] += sum;
  });
}

// Copies `rows` rows of one head, `stride` floats apart in the models' (N, heads, head_dim)
// layout, into a contiguous (rows, dim) block (ScatterRows: back out of one): MKL's
// single-threaded GEMMs run at ~150 GFLOP/s on contiguous blocks and ~100 on the strided rows.
static void GatherRows(const float* strided, int64_t stride, int64_t rows, int64_t dim, float* block) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(block + r * dim, strided + r * stride, dim * sizeof(float));
}

static void ScatterRows(const float* block, int64_t rows, int64_t dim, float* strided, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(strided + r * stride, block + r * dim, dim * sizeof(float));
}

static ffi::Error AttentionForward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale,
                                   const DecomposedBias& bias) {
  AttentionShape sh;
  if (auto error = AttentionShapeOf(q.dimensions(), k.dimensions(), v.dimensions(), &sh); error.failure())
    return error;
  const int64_t row = sh.heads * sh.dim;  // floats between a head's consecutive tokens
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();
  if (sh.batch * sh.heads * sh.queries == 0) return ffi::Error::Success();  // an empty output
  if (sh.keys == 0 || sh.dim == 0) {  // nothing to attend: zeros, and a log-sum-exp of -inf
    std::fill(out_data, out_data + sh.batch * sh.queries * row, 0.0f);
    std::fill(lse_data, lse_data + sh.batch * sh.heads * sh.queries, -std::numeric_limits<float>::infinity());
    return ffi::Error::Success();
  }
  const float* q_data = q.typed_data();
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  const int64_t dim = sh.dim, heads = sh.batch * sh.heads;
  // Each unit: one head's keys and values (copied once) against a span of its queries. Heads are
  // split into spans only when there are too few of them to keep every thread busy.
  const int64_t query_blocks = (sh.queries + kQueryBlock - 1) / kQueryBlock;
  const int64_t spans = std::min<int64_t>(query_blocks, (4 * MaxThreads() + heads - 1) / heads);
  const int64_t blocks_per_span = (query_blocks + spans - 1) / spans;
  ParallelFor(heads * spans, [&](int64_t unit) {
    const int64_t bh = unit / spans, b = bh / sh.heads, h = bh % sh.heads;
    const int64_t span_first = (unit % spans) * blocks_per_span * kQueryBlock;
    const int64_t span_end = std::min(sh.queries, span_first + blocks_per_span * kQueryBlock);
    if (span_first >= span_end) return;
    float* keys = Scratch(2 * sh.keys * dim + kQueryBlock * (kKeyBlock + 2 * dim + 2));
    float *values = keys + sh.keys * dim, *queries = values + sh.keys * dim;
    float *logits = queries + kQueryBlock * dim, *acc = logits + kQueryBlock * kKeyBlock;
    float *max = acc + kQueryBlock * dim, *sum = max + kQueryBlock;
    GatherRows(k_data + b * sh.keys * row + h * dim, row, sh.keys, dim, keys);
    GatherRows(v_data + b * sh.keys * row + h * dim, row, sh.keys, dim, values);
    for (int64_t first = span_first; first < span_end; first += kQueryBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kQueryBlock, span_end - first));
      GatherRows(q_data + (b * sh.queries + first) * row + h * dim, row, rows, dim, queries);
      std::fill(acc, acc + rows * dim, 0.0f);
      std::fill(max, max + rows, -std::numeric_limits<float>::infinity());
      std::fill(sum, sum + rows, 0.0f);
      for (int64_t key = 0; key < sh.keys; key += kKeyBlock) {
        const int cols = static_cast<int>(std::min<int64_t>(kKeyBlock, sh.keys - key));
        GemmRowMajor(false, true, rows, cols, dim, scale, queries, dim, keys + key * dim, dim, 0.0f, logits,
                     kKeyBlock);
        for (int r = 0; r < rows; ++r) {
          float* s = logits + r * kKeyBlock;
          if (bias.rows) AddBias(bias, bh * sh.queries + first + r, s, key, cols);
          const float block_max = RowMax(s, cols, max[r]);
          const float block_sum = ExpInPlace(s, cols, block_max);
          const float correction = std::exp(max[r] - block_max);  // 0 for the first block
          sum[r] = sum[r] * correction + block_sum;
          max[r] = block_max;
          float* a = acc + r * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
        }
        GemmRowMajor(false, false, rows, dim, cols, 1.0f, logits, kKeyBlock, values + key * dim, dim, 1.0f, acc, dim);
      }
      for (int r = 0; r < rows; ++r) {
        const float inverse = 1.0f / sum[r];
        for (int64_t d = 0; d < dim; ++d) acc[r * dim + d] *= inverse;
        lse_data[bh * sh.queries + first + r] = max[r] + std::log(sum[r]);
      }
      ScatterRows(acc, rows, dim, out_data + (b * sh.queries + first) * row + h * dim, row);
    }
  });
  return ffi::Error::Success();
}

static ffi::Error BiasShapeOf(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& rows,
                              ffi::Buffer<ffi::F32>& cols, DecomposedBias* bias) {
  auto qd = q.dimensions(), kd = k.dimensions(), rd = rows.dimensions(), cd = cols.dimensions();
  const size_t rank = qd.size();
  bool ok = rd.size() == rank && cd.size() == rank && rank >= 3;
  for (size_t i = 0; ok && i + 3 < rank; ++i) ok = rd[i] == qd[i] && cd[i] == qd[i];
  ok = ok && rd[rank - 3] == qd[rank - 2] && cd[rank - 3] == qd[rank - 2] && rd[rank - 2] == qd[rank - 3] &&
       cd[rank - 2] == qd[rank - 3] && rd[rank - 1] * cd[rank - 1] == kd[rank - 3] && cd[rank - 1] > 0;
  if (!ok)
    return ffi::Error::InvalidArgument("mfjax_cpu_attention: bias tables " + Shape(rd) + " and " + Shape(cd) +
                                       " are not (..., heads, N_q, key rows) and (..., heads, N_q, key columns) "
                                       "for q " + Shape(qd) + " and k " + Shape(kd));
  bias->rows = rows.typed_data();
  bias->cols = cols.typed_data();
  bias->height = rd[rank - 1];
  bias->width = cd[rank - 1];
  return ffi::Error::Success();
}

// The attention handlers' bindings: `args` float32 buffers in, `rets` out, and the scale.
template <int args, int rets, typename Binding>
static auto F32Buffers(Binding binding) {
  if constexpr (args > 0) {
    return F32Buffers<args - 1, rets>(std::move(binding).template Arg<ffi::Buffer<ffi::F32>>());
  } else if constexpr (rets > 0) {
    return F32Buffers<0, rets - 1>(std::move(binding).template Ret<ffi::Buffer<ffi::F32>>());
  } else {
    return std::move(binding).template Attr<float>("scale");
  }
}

static ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  return AttentionForward(q, k, v, out, lse, scale, DecomposedBias());
}

static ffi::Error AttentionBiasImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                    ffi::Buffer<ffi::F32> bias_rows, ffi::Buffer<ffi::F32> bias_cols,
                                    ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  DecomposedBias bias;
  if (auto error = BiasShapeOf(q, k, bias_rows, bias_cols, &bias); error.failure()) return error;
  return AttentionForward(q, k, v, out, lse, scale, bias);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfjaxCpuAttention, AttentionImpl, (F32Buffers<3, 2>(ffi::Ffi::Bind())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfjaxCpuAttentionBias, AttentionBiasImpl, (F32Buffers<5, 2>(ffi::Ffi::Bind())));

static ffi::Error AttentionBackward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> grad_out,
                                    ffi::Buffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> grad_q,
                                    ffi::ResultBuffer<ffi::F32> grad_k, ffi::ResultBuffer<ffi::F32> grad_v,
                                    float scale, const DecomposedBias& bias) {
  AttentionShape sh;
  if (auto error = AttentionShapeOf(q.dimensions(), k.dimensions(), v.dimensions(), &sh); error.failure())
    return error;
  const int64_t row = sh.heads * sh.dim;
  float* dq_data = grad_q->typed_data();
  float* dk_data = grad_k->typed_data();
  float* dv_data = grad_v->typed_data();
  if (bias.rows) {  // each head's thread adds into its own rows of the tables' gradients
    std::fill(bias.grad_rows, bias.grad_rows + sh.batch * sh.heads * sh.queries * bias.height, 0.0f);
    std::fill(bias.grad_cols, bias.grad_cols + sh.batch * sh.heads * sh.queries * bias.width, 0.0f);
  }
  if (sh.keys == 0 || sh.queries == 0 || sh.dim == 0) {
    std::fill(dq_data, dq_data + sh.batch * sh.queries * row, 0.0f);
    std::fill(dk_data, dk_data + sh.batch * sh.keys * row, 0.0f);
    std::fill(dv_data, dv_data + sh.batch * sh.keys * row, 0.0f);
    return ffi::Error::Success();
  }
  const float* q_data = q.typed_data();
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  const float* o_data = out.typed_data();
  const float* do_data = grad_out.typed_data();
  const float* lse_data = lse.typed_data();
  const int64_t dim = sh.dim, m = sh.queries, n = sh.keys;
  // One (batch, head) per unit: its thread alone accumulates that head's dq, dk and dv.
  ParallelFor(sh.batch * sh.heads, [&](int64_t bh) {
    const int64_t b = bh / sh.heads, h = bh % sh.heads;
    const int64_t q_offset = b * m * row + h * dim, k_offset = b * n * row + h * dim;
    float* queries = Scratch(3 * m * dim + 4 * n * dim + m + 2 * kQueryBlock * kKeyBlock);
    float *grad_out_rows = queries + m * dim, *grad_queries = grad_out_rows + m * dim;
    float *keys = grad_queries + m * dim, *values = keys + n * dim, *grad_keys = values + n * dim;
    float *grad_values = grad_keys + n * dim, *delta = grad_values + n * dim, *weights = delta + m;
    float* grad_weights = weights + kQueryBlock * kKeyBlock;
    GatherRows(q_data + q_offset, row, m, dim, queries);
    GatherRows(do_data + q_offset, row, m, dim, grad_out_rows);
    GatherRows(k_data + k_offset, row, n, dim, keys);
    GatherRows(v_data + k_offset, row, n, dim, values);
    std::fill(grad_queries, grad_queries + m * dim, 0.0f);
    std::fill(grad_keys, grad_keys + 2 * n * dim, 0.0f);  // and grad_values
    for (int64_t i = 0; i < m; ++i) {  // delta_i = do_i . o_i, the softmax gradient's row term
      const float* o = o_data + q_offset + i * row;
      const float* g = grad_out_rows + i * dim;
      float dot = 0.0f;
      for (int64_t d = 0; d < dim; ++d) dot += o[d] * g[d];
      delta[i] = dot;
    }
    for (int64_t first = 0; first < m; first += kQueryBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kQueryBlock, m - first));
      const float *q_block = queries + first * dim, *do_block = grad_out_rows + first * dim;
      float* dq_block = grad_queries + first * dim;
      for (int64_t key = 0; key < n; key += kKeyBlock) {
        const int cols = static_cast<int>(std::min<int64_t>(kKeyBlock, n - key));
        const float *k_block = keys + key * dim, *v_block = values + key * dim;
        GemmRowMajor(false, true, rows, cols, dim, scale, q_block, dim, k_block, dim, 0.0f, weights, kKeyBlock);
        for (int r = 0; r < rows; ++r) {
          if (bias.rows) AddBias(bias, bh * m + first + r, weights + r * kKeyBlock, key, cols);
          ExpInPlace(weights + r * kKeyBlock, cols, lse_data[bh * m + first + r]);
        }
        // dv += p^T do;  dp = do v^T;  ds = p (dp - delta);  dq += scale ds k;  dk += scale ds^T q
        GemmRowMajor(true, false, cols, dim, rows, 1.0f, weights, kKeyBlock, do_block, dim, 1.0f,
                     grad_values + key * dim, dim);
        GemmRowMajor(false, true, rows, cols, dim, 1.0f, do_block, dim, v_block, dim, 0.0f, grad_weights, kKeyBlock);
        for (int r = 0; r < rows; ++r) {
          const float* __restrict p = weights + r * kKeyBlock;
          float* __restrict ds = grad_weights + r * kKeyBlock;
          const float dr = delta[first + r];
#pragma omp simd
          for (int c = 0; c < cols; ++c) ds[c] = p[c] * (ds[c] - dr);
          if (bias.rows) AccumulateBiasGrad(bias, bh * m + first + r, ds, key, cols);
        }
        GemmRowMajor(false, false, rows, dim, cols, scale, grad_weights, kKeyBlock, k_block, dim, 1.0f, dq_block, dim);
        GemmRowMajor(true, false, cols, dim, rows, scale, grad_weights, kKeyBlock, q_block, dim, 1.0f,
                     grad_keys + key * dim, dim);
      }
    }
    ScatterRows(grad_queries, m, dim, dq_data + q_offset, row);
    ScatterRows(grad_keys, n, dim, dk_data + k_offset, row);
    ScatterRows(grad_values, n, dim, dv_data + k_offset, row);
  });
  return ffi::Error::Success();
}

static ffi::Error AttentionGradImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> grad_out,
                                    ffi::Buffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> grad_q,
                                    ffi::ResultBuffer<ffi::F32> grad_k, ffi::ResultBuffer<ffi::F32> grad_v,
                                    float scale) {
  return AttentionBackward(q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, scale, DecomposedBias());
}

static ffi::Error AttentionBiasGradImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                        ffi::Buffer<ffi::F32> bias_rows, ffi::Buffer<ffi::F32> bias_cols,
                                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> grad_out,
                                        ffi::Buffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> grad_q,
                                        ffi::ResultBuffer<ffi::F32> grad_k, ffi::ResultBuffer<ffi::F32> grad_v,
                                        ffi::ResultBuffer<ffi::F32> grad_bias_rows,
                                        ffi::ResultBuffer<ffi::F32> grad_bias_cols, float scale) {
  DecomposedBias bias;
  if (auto error = BiasShapeOf(q, k, bias_rows, bias_cols, &bias); error.failure()) return error;
  bias.grad_rows = grad_bias_rows->typed_data();
  bias.grad_cols = grad_bias_cols->typed_data();
  return AttentionBackward(q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, scale, bias);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfjaxCpuAttentionBiasGrad, AttentionBiasGradImpl, (F32Buffers<8, 5>(ffi::Ffi::Bind())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfjaxCpuAttentionGrad, AttentionGradImpl, (F32Buffers<6, 3>(ffi::Ffi::Bind())));
