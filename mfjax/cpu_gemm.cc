// mfjax's float32 CPU GEMM: an XLA FFI handler that runs out[..., M, N] = op(a) @ op(b) through
// MKL's sgemm_ (one matrix) or sgemm_batch_ (a batch of them). mfjax/cpu_gemm.py compiles this
// file, loads the MKL library and hands its two functions over with MfjaxCpuGemmSetBlas.
//
// Operands are row-major with the same leading (batch) dimensions; op() transposes the last two
// dimensions when transpose_a / transpose_b is set. MKL is column-major, so the row-major
// product out = op(a) op(b) is computed as the column-major out^T = op(b)^T op(a)^T.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);
using SgemmBatch = void (*)(const char*, const char*, const int*, const int*, const int*,
                            const float*, const float**, const int*, const float**, const int*,
                            const float*, float**, const int*, const int*, const int*);

static Sgemm sgemm = nullptr;
static SgemmBatch sgemm_batch = nullptr;

extern "C" void MfjaxCpuGemmSetBlas(void* sgemm_fn, void* sgemm_batch_fn) {
  sgemm = reinterpret_cast<Sgemm>(sgemm_fn);
  sgemm_batch = reinterpret_cast<SgemmBatch>(sgemm_batch_fn);
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
