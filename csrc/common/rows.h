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
