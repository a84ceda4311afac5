// imp-jax's native CPU matmul (ops/native_cpu.py builds it with the system's g++ and registers it with jax.ffi).
//
// y[M, N] = x[M, K] @ W.T, with W held as int8 codes q[N, K] and a scale s and an offset o per block of B along K
// (B = K / s's last dimension, a multiple of 16): W[n, k] = s[n, k / B] * q[n, k] + o[n, k / B]. Every GGUF format
// that decodes as scale * code (+ offset) per sub-block maps onto it exactly (gguf/quant.py, affine_rows), so the
// product reads about 1.25 bytes a weight instead of f32's 4, with f32 activations and f32 accumulation:
//   y[m, n] = sum_b s[n, b] * (sum_{k in b} q[n, k] x[m, k]) + o[n, b] * (sum_{k in b} x[m, k]).
// XLA:CPU has no product for a narrower weight that beats its f32 GEMV (docs/BENCHMARKS.md, CPU): a bf16 or int8
// matrix converted inside its dot is bound by the conversion. Here the codes widen in registers (AVX-512).
//
// Every output is computed by the same sequence of explicit FMAs whatever M is or which rows share a pass, so a
// row's result does not depend on the batch it came in (a batch gives what each prompt gives alone).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifndef __AVX512F__
#error "the native CPU matmul needs AVX-512 (imp-jax then uses XLA's f32 product)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 4;  // rows of x that share one pass over a row of codes

inline __m512 codes16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Outputs y[r0 + r, n + i] for i < kN rows of W and r < rows (at most kM) rows of x. Every output is the same
// sequence of FMAs in any tile: per block, t = sum over its 16-wide slices of codes * x, then acc += scale * t and
// off += offset * sum(x over the block). kN > 1 interleaves rows of W (independent chains: one decode row alone
// would wait on the FMA latency); kM > 1 reads each 16 codes once for several rows of x.
template <int kN, int kM>
void Tile(const float* X, const int8_t* W, const float* xsum, float* Y, int64_t n, int64_t r0, int64_t rows,
          int64_t n_out, int64_t k, int64_t nb, int64_t row) {
  const int64_t bs = k / nb;
  __m512 acc[kN][kM];
  float off[kN][kM];
  for (int i = 0; i < kN; ++i) {
    for (int r = 0; r < kM; ++r) {
      acc[i][r] = _mm512_setzero_ps();
      off[i][r] = 0.0f;
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    __m512 t[kN][kM];
    for (int i = 0; i < kN; ++i) {
      for (int r = 0; r < kM; ++r) t[i][r] = _mm512_setzero_ps();
    }
    for (int64_t j = b * bs; j < (b + 1) * bs; j += 16) {
      __m512 x[kM];
      for (int r = 0; r < rows; ++r) x[r] = _mm512_loadu_ps(X + (r0 + r) * k + j);
      for (int i = 0; i < kN; ++i) {
        const __m512 w = codes16(W + (n + i) * row + j);
        for (int r = 0; r < rows; ++r) t[i][r] = _mm512_fmadd_ps(w, x[r], t[i][r]);
      }
    }
    for (int i = 0; i < kN; ++i) {
      const int8_t* sn = W + (n + i) * row + k;  // the row's scales, then its offsets (f32, unaligned)
      float sb, ob;
      __builtin_memcpy(&sb, sn + 4 * b, 4);
      __builtin_memcpy(&ob, sn + 4 * (nb + b), 4);
      const __m512 scale = _mm512_set1_ps(sb);
      for (int r = 0; r < rows; ++r) {
        acc[i][r] = _mm512_fmadd_ps(scale, t[i][r], acc[i][r]);
        off[i][r] = __builtin_fmaf(ob, xsum[(r0 + r) * nb + b], off[i][r]);
      }
    }
  }
  for (int i = 0; i < kN; ++i) {
    for (int r = 0; r < rows; ++r) Y[(r0 + r) * n_out + n + i] = _mm512_reduce_add_ps(acc[i][r]) + off[i][r];
  }
}

constexpr int kInterleave = 8;  // output rows of one decode row computed together

// Chunks of output rows claimed from a counter by the calling thread and by helpers on XLA's intra-op pool (no
// thread pool of our own competing with XLA's for the cores). The caller never waits for a chunk nobody took: a
// helper that starts late finds none left and returns, so the call cannot wait on a pool that is busy or that
// the caller itself is the only thread of.
struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  std::function<void(int64_t)> work;

  void Run() {
    for (int64_t c = next.fetch_add(1); c < count; c = next.fetch_add(1)) {
      work(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

constexpr int64_t kSerialWork = int64_t{1} << 18;  // below this many multiply-adds one thread does it all
constexpr int64_t kChunksPerThread = 4;

ffi::Error AffineMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  // w: [N, K + 8 * nb] int8, each row its K codes, then nb f32 scales and nb f32 offsets (as bytes)
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  const int64_t n_out = wd[0], row = wd[1], k = xd.back(), nb = (row - k) / 8;
  const int64_t m = k ? static_cast<int64_t>(x.element_count()) / k : 0;
  if (wd.size() != 2 || nb <= 0 || row != k + 8 * nb || k % nb || (k / nb) % 16) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "native_cpu_matmul: rows must be K codes + 8 bytes a block");
  }
  const int64_t bs = k / nb;
  const float* X = x.typed_data();
  const int8_t* W = w.typed_data();
  float* Y = y->typed_data();
  std::vector<float> xsum(m * nb);  // each block's sum of x, for the offsets
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      float t = 0.0f;
      for (int64_t i = 0; i < bs; ++i) t += X[r * k + b * bs + i];
      xsum[r * nb + b] = t;
    }
  }
  const float* XS = xsum.data();
  const int64_t threads = n_out * k * std::max<int64_t>(m, 1) < kSerialWork ? 1 : 1 + pool.num_threads();
  auto chunks = std::make_shared<Chunks>();
  chunks->count = std::min(n_out, threads * kChunksPerThread);
  const int64_t per = (n_out + chunks->count - 1) / std::max<int64_t>(chunks->count, 1);
  chunks->work = [=](int64_t c) {
    const int64_t end = std::min(n_out, (c + 1) * per);
    int64_t n = c * per;
    if (m == 1) {
      for (; n + kInterleave <= end; n += kInterleave) Tile<kInterleave, 1>(X, W, XS, Y, n, 0, 1, n_out, k, nb, row);
    }
    for (; n < end; ++n) {
      for (int64_t r0 = 0; r0 < m; r0 += kRows) {
        Tile<1, kRows>(X, W, XS, Y, n, r0, std::min(kRows, m - r0), n_out, k, nb, row);
      }
    }
  };
  for (int64_t i = 1; i < std::min(threads, chunks->count); ++i) pool.Schedule([chunks] { chunks->Run(); });
  chunks->Run();
  while (chunks->done.load(std::memory_order_acquire) < chunks->count) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImpJaxAffineMatmul, AffineMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
