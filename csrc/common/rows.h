// Row helpers for the CPU twins of the row-wise ops (layer norm, bias+GELU, cross-entropy): a storage row
// (fp32/bf16/fp16) converted into an fp32 scratch buffer of whole vectors and back, and a per-thread scratch
// allocation. The math then runs on whole vf vectors; the tail of the last vector holds a caller-chosen pad value.
#pragma once
#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "common/dtype.h"
#include "common/vec_math.h"

namespace dlcore {

inline int64_t vectors_for(int64_t n) { return (n + VW - 1) / VW; }

template <int DT>
inline void load_row(const typename Storage<DT>::T* src, int64_t n, float* dst, float pad) {
  using St = Storage<DT>;
  const int64_t padded = vectors_for(n) * VW;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = St::load(src[i]);
  for (int64_t i = n; i < padded; ++i) dst[i] = pad;
}

template <int DT>
inline void store_row(const float* src, int64_t n, typename Storage<DT>::T* dst) {
  using St = Storage<DT>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = St::store(src[i]);
}

// Σ_i a[i] and Σ_i (a[i] − shift)·b[i] over a vf-aligned row of nv whole vectors, with four independent
// accumulators (one accumulator is bound by the add latency, ~4 cycles a vector). Padding lanes must make their
// terms 0 (e.g. a = 0 and b = 0 there).
inline float vsum(const vf* a, int64_t nv) {
  vf acc[4] = {};
  int64_t k = 0;
  for (; k + 4 <= nv; k += 4)
    for (int u = 0; u < 4; ++u) acc[u] += a[k + u];
  for (; k < nv; ++k) acc[0] += a[k];
  return sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

inline float vdot_shifted(const vf* a, float shift, const vf* b, int64_t nv) {
  vf acc[4] = {};
  int64_t k = 0;
  for (; k + 4 <= nv; k += 4)
    for (int u = 0; u < 4; ++u) acc[u] += (a[k + u] - shift) * b[k + u];
  for (; k < nv; ++k) acc[0] += (a[k] - shift) * b[k];
  return sum_lanes((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Per-thread fp32 partial sums of `cols` columns, combined in thread order (deterministic for a thread count).
// Each thread's row starts on a vector boundary and is padded to whole vectors (so it may be used as vf*).
struct ColumnPartials {
  int threads;
  int64_t cols, stride;
  std::vector<vf> data;
  ColumnPartials(int threads_, int64_t cols_)
      : threads(threads_), cols(cols_), stride(vectors_for(cols_) * VW),
        data(static_cast<size_t>(threads_ * vectors_for(cols_)), vf{}) {}
  float* of_thread(int t) { return reinterpret_cast<float*>(data.data()) + int64_t(t) * stride; }
  void reduce_into(float* out) const {  // out may be null (gradient not wanted)
    if (!out) return;
    const float* base = reinterpret_cast<const float*>(data.data());
    for (int64_t c = 0; c < cols; ++c) {
      float s = 0.f;
      for (int t = 0; t < threads; ++t) s += base[int64_t(t) * stride + c];
      out[c] = s;
    }
  }
};

}  // namespace dlcore
