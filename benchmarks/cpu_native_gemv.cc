// Measurement prototype (benchmarks/cpu_native_gemv.py): y[M, N] = x[M, K] @ W.T on the CPU, through jax.ffi,
// with W held as int8 codes q[N, K] and a scale s and offset o per block of B along K:
// W[n, k] = s[n, k/B] * q[n, k] + o[n, k/B]. Every GGUF format whose decoder is scale * code (+ offset) per
// sub-block (Q4_0 ... Q8_0, the K-quants, IQ4) maps onto it exactly. f32 activations, f32 accumulation;
// AVX-512 (the 2-core CI machine has it). Not part of the package: it measures what a native CPU kernel would gain.
#include <cstdint>
#include <vector>
#include <immintrin.h>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
typedef float v16f __attribute__((vector_size(64)));

static inline v16f load_codes(const int8_t* p) {
  return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline v16f loadf(const float* p) { v16f v; __builtin_memcpy(&v, p, 64); return v; }

static ffi::Error Impl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> s,
                       ffi::Buffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(); auto qd = q.dimensions(); auto sd = s.dimensions();
  const int64_t K = xd.back(), M = x.element_count() / K, N = qd[0], nb = sd.back(), B = K / nb;
  const float* X = x.typed_data(); const int8_t* Q = q.typed_data();
  const float* S = s.typed_data(); const float* O = o.typed_data(); float* Y = y->typed_data();
  std::vector<float> xs(M * nb);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      float t = 0; for (int64_t i = 0; i < B; ++i) t += X[m * K + b * B + i]; xs[m * nb + b] = t;
    }
#pragma omp parallel for schedule(static) if (N * K >= (1 << 21))
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* qr = Q + n * K; const float* sr = S + n * nb; const float* orow = O + n * nb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = X + m * K;
      v16f acc = {}; float off = 0;
      for (int64_t b = 0; b < nb; ++b) {
        v16f t = {};
        for (int64_t j = 0; j < B; j += 16) t += load_codes(qr + b * B + j) * loadf(xr + b * B + j);
        acc += sr[b] * t; off += orow[b] * xs[m * nb + b];
      }
      float sum = off; for (int i = 0; i < 16; ++i) sum += acc[i];
      Y[m * N + n] = sum;
    }
  }
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(AffineGemv, Impl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S8>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
