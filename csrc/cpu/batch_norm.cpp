// The CPU twin of dlcore's channel-wise kernels (dlcore/ops/batch_norm.py): fused batch norm + residual add +
// activation, and the conv epilogue of dlcore/ops/conv_relu.py (bias + residual + ReLU), which is the same
// "per-channel affine + residual + activation" pass with scale 1.
// A tensor of C channels is addressed as [outer, C, inner]: NCHW is (N, C, H·W), channels_last and [N, C] are
// (N·H·W, C, 1). Storage fp32/bf16/fp16, math in fp32, per-channel accumulation in double.
//   stats:            μ_c, σ²_c (biased) in one pass over x: each (n, c) plane, or each chunk of channels_last
//                     rows, gives (count, mean, M2) from two passes over cache-resident data; partials merge with
//                     Chan's formula  δ = m_b − m_a, m = m_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n.
//   apply:            y = act(scale_c·x + shift_c + r)        (scale absent: 1; shift absent: 0; r optional)
//   backward_reduce:  dz = act'(y)·dy (y is the saved output: y > 0 ⇔ z > 0 for ReLU and LeakyReLU with slope ≥ 0);
//                     S1_c = Σ dz, S2_c = Σ dz·(x − μ_c); dz itself written when asked (the residual's gradient)
//   backward_apply:   dx = a_c·dz + b_c·x + k_c               (the launcher folds γ, ρ, S1, S2 into a, b, k)
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "common/channel_act.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

constexpr int64_t kChunkRows = 64;  // channels_last rows per cache-resident chunk

// Per-thread, per-channel accumulators in double, combined in thread order (deterministic for a thread count).
struct ChannelPartials {
  int threads;
  int64_t channels;
  std::vector<double> a, b, n;
  ChannelPartials(int threads_, int64_t channels_)
      : threads(threads_), channels(channels_), a(size_t(threads_ * channels_), 0.0),
        b(size_t(threads_ * channels_), 0.0), n(size_t(threads_ * channels_), 0.0) {}
  size_t at(int t, int64_t c) const { return size_t(t) * size_t(channels) + size_t(c); }
};

// (n_a, m_a, M2_a) ← merge with (n_b, m_b, M2_b)
// Chan's merge of (n, mean, m2) with a part (nb > 0 rows): no branch, so that a loop over channels vectorises.
inline void chan_merge_rows(double& n, double& mean, double& m2, double nb, double mean_b, double m2b) {
  const double total = n + nb;
  const double d = mean_b - mean;
  mean += d * nb / total;
  m2 += m2b + d * d * n * nb / total;
  n = total;
}

inline void chan_merge(double& n, double& mean, double& m2, double nb, double mean_b, double m2b) {
  if (n + nb != 0.0) chan_merge_rows(n, mean, m2, nb, mean_b, m2b);
}

template <int DT>
void stats(const void* x_, float* mean_out, float* var_out, int64_t outer, int64_t channels, int64_t inner) {
  using St = Storage<DT>;
  const auto* x = static_cast<const typename St::T*>(x_);
  ChannelPartials part(omp_get_max_threads(), channels);  // a: mean, b: M2, n: count
#pragma omp parallel num_threads(part.threads)
  {
    const int t = omp_get_thread_num();
    if (inner > 1) {
#pragma omp for collapse(2) schedule(static)
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t c = 0; c < channels; ++c) {
          const auto* plane = x + (o * channels + c) * inner;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < inner; ++i) sum += St::load(plane[i]);
          const float m = sum / float(inner);
          float m2 = 0.f;
#pragma omp simd reduction(+ : m2)
          for (int64_t i = 0; i < inner; ++i) {
            const float d = St::load(plane[i]) - m;
            m2 += d * d;
          }
          const size_t k = part.at(t, c);
          chan_merge(part.n[k], part.a[k], part.b[k], double(inner), m, m2);
        }
    } else {
      std::vector<float> mean_buf(static_cast<size_t>(channels)), m2_buf(static_cast<size_t>(channels));
      float* chunk_mean = mean_buf.data();
      float* chunk_m2 = m2_buf.data();
      const int64_t chunks = (outer + kChunkRows - 1) / kChunkRows;
#pragma omp for schedule(static)
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t first = k * kChunkRows, rows = std::min(kChunkRows, outer - first);
        std::fill(chunk_mean, chunk_mean + channels, 0.f);
        std::fill(chunk_m2, chunk_m2 + channels, 0.f);
        for (int64_t r = first; r < first + rows; ++r) {
          const auto* row = x + r * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) chunk_mean[c] += St::load(row[c]);
        }
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) chunk_mean[c] /= float(rows);
        for (int64_t r = first; r < first + rows; ++r) {
          const auto* row = x + r * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            const float d = St::load(row[c]) - chunk_mean[c];
            chunk_m2[c] += d * d;
          }
        }
        // every channel at once, as one vector loop (the chunk has rows: the branch-free merge). Scalar calls
        // through part.at (two double divisions per channel and chunk) took over half of the channels_last stats
        // time ([8,64,56,56] fp32: 0.40 ms, where streaming x once takes ~0.15).
        double* __restrict n_t = &part.n[part.at(t, 0)];
        double* __restrict mean_t = &part.a[part.at(t, 0)];
        double* __restrict m2_t = &part.b[part.at(t, 0)];
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c)
          chan_merge_rows(n_t[c], mean_t[c], m2_t[c], double(rows), chunk_mean[c], chunk_m2[c]);
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int t = 0; t < part.threads; ++t) {
      const size_t k = part.at(t, c);
      chan_merge(n, mean, m2, part.n[k], part.a[k], part.b[k]);
    }
    mean_out[c] = float(mean);
    var_out[c] = float(n > 0.0 ? m2 / n : 0.0);
  }
}

template <int DT, int ACT, bool HAS_R, bool HAS_SCALE, bool HAS_SHIFT>
void apply(const void* x_, const void* r_, const float* scale, const float* shift, void* y_, int64_t outer,
           int64_t channels, int64_t inner, float slope) {
  using St = Storage<DT>;
  using T = typename St::T;
  const T* x = static_cast<const T*>(x_);
  const T* r = static_cast<const T*>(r_);
  T* y = static_cast<T*>(y_);  // may be x itself (in place)
  if (inner > 1) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t base = (o * channels + c) * inner;
        const float s = HAS_SCALE ? scale[c] : 1.f, b = HAS_SHIFT ? shift[c] : 0.f;
#pragma omp simd
        for (int64_t i = 0; i < inner; ++i) {
          float z = s * St::load(x[base + i]) + b;
          if (HAS_R) z += St::load(r[base + i]);
          y[base + i] = St::store(channel_activate<ACT>(z, slope));
        }
      }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < outer; ++o) {
    const int64_t base = o * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      float z = (HAS_SCALE ? scale[c] : 1.f) * St::load(x[base + c]) + (HAS_SHIFT ? shift[c] : 0.f);
      if (HAS_R) z += St::load(r[base + c]);
      y[base + c] = St::store(channel_activate<ACT>(z, slope));
    }
  }
}

template <int DT, int ACT, bool HAS_X, bool HAS_DZ>
void backward_reduce(const void* dy_, const void* y_, const void* x_, const float* mean, void* dz_, float* sum_dz,
                     float* sum_dz_xmu, int64_t outer, int64_t channels, int64_t inner, float slope) {
  using St = Storage<DT>;
  using T = typename St::T;
  const T* __restrict dy = static_cast<const T*>(dy_);
  const T* __restrict y = static_cast<const T*>(y_);
  const T* __restrict x = static_cast<const T*>(x_);
  T* __restrict dz = static_cast<T*>(dz_);
  ChannelPartials part(omp_get_max_threads(), channels);  // a: Σ dz, b: Σ dz·(x − μ)
#pragma omp parallel num_threads(part.threads)
  {
    const int t = omp_get_thread_num();
    if (inner > 1) {
#pragma omp for collapse(2) schedule(static)
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t base = (o * channels + c) * inner;
          const float m = HAS_X ? mean[c] : 0.f;
          float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t i = base; i < base + inner; ++i) {
            const float g = channel_activation_grad<ACT>(St::load(dy[i]), ACT ? St::load(y[i]) : 0.f, slope);
            if (HAS_DZ) dz[i] = St::store(g);
            s1 += g;
            if (HAS_X) s2 += g * (St::load(x[i]) - m);
          }
          part.a[part.at(t, c)] += s1;
          part.b[part.at(t, c)] += s2;
        }
    } else {
      std::vector<float> s1_buf(static_cast<size_t>(channels)), s2_buf(static_cast<size_t>(channels));
      float* __restrict s1 = s1_buf.data();
      float* __restrict s2 = s2_buf.data();
      const int64_t chunks = (outer + kChunkRows - 1) / kChunkRows;
#pragma omp for schedule(static)
      for (int64_t k = 0; k < chunks; ++k) {
        std::fill(s1, s1 + channels, 0.f);
        std::fill(s2, s2 + channels, 0.f);
        for (int64_t r = k * kChunkRows; r < std::min(outer, (k + 1) * kChunkRows); ++r) {
          const int64_t base = r * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            const int64_t i = base + c;
            const float g = channel_activation_grad<ACT>(St::load(dy[i]), ACT ? St::load(y[i]) : 0.f, slope);
            if (HAS_DZ) dz[i] = St::store(g);
            s1[c] += g;
            if (HAS_X) s2[c] += g * (St::load(x[i]) - mean[c]);
          }
        }
        for (int64_t c = 0; c < channels; ++c) {
          part.a[part.at(t, c)] += s1[c];
          part.b[part.at(t, c)] += s2[c];
        }
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    double a = 0.0, b = 0.0;
    for (int t = 0; t < part.threads; ++t) {
      a += part.a[part.at(t, c)];
      b += part.b[part.at(t, c)];
    }
    if (sum_dz) sum_dz[c] = float(a);
    if (sum_dz_xmu) sum_dz_xmu[c] = float(b);
  }
}

template <int DT, int ACT, bool HAS_BK>
void backward_apply(const void* dy_, const void* y_, const void* x_, const float* a, const float* b, const float* k,
                    void* dx_, int64_t outer, int64_t channels, int64_t inner, float slope) {
  using St = Storage<DT>;
  using T = typename St::T;
  const T* __restrict dy = static_cast<const T*>(dy_);
  const T* __restrict y = static_cast<const T*>(y_);
  const T* __restrict x = static_cast<const T*>(x_);
  T* __restrict dx = static_cast<T*>(dx_);
  if (inner > 1) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t base = (o * channels + c) * inner;
        const float ac = a[c], bc = HAS_BK ? b[c] : 0.f, kc = HAS_BK ? k[c] : 0.f;
#pragma omp simd
        for (int64_t i = base; i < base + inner; ++i) {
          const float g = channel_activation_grad<ACT>(St::load(dy[i]), ACT ? St::load(y[i]) : 0.f, slope);
          dx[i] = St::store(HAS_BK ? ac * g + bc * St::load(x[i]) + kc : ac * g);
        }
      }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < outer; ++o) {
    const int64_t base = o * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t i = base + c;
      const float g = channel_activation_grad<ACT>(St::load(dy[i]), ACT ? St::load(y[i]) : 0.f, slope);
      dx[i] = St::store(HAS_BK ? a[c] * g + b[c] * St::load(x[i]) + k[c] : a[c] * g);
    }
  }
}

template <class T>
T* ptr(int64_t addr) {
  return reinterpret_cast<T*>(addr);
}

}  // namespace

void register_batch_norm(py::module_& m) {
  m.def(
      "batch_norm_stats",
      [](int64_t x, int64_t mean, int64_t var, int64_t outer, int64_t channels, int64_t inner, int dtype) {
        py::gil_scoped_release nogil;
        dispatch_dtype(dtype, "x", [&](auto dt) {
          stats<decltype(dt)::value>(ptr<void>(x), ptr<float>(mean), ptr<float>(var), outer, channels, inner);
        });
      },
      "Per-channel mean and biased variance of x [outer, C, inner] (fp32 outputs)", py::arg("x"), py::arg("mean"),
      py::arg("var"), py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("dtype"));
  m.def(
      "channel_affine_act",
      [](int64_t x, int64_t r, int64_t scale, int64_t shift, int64_t y, int64_t outer, int64_t channels,
         int64_t inner, int act, float slope, int dtype) {
        py::gil_scoped_release nogil;
        dispatch_dtype(dtype, "x", [&](auto dt) {
          dispatch_channel_activation(act, [&](auto ac) {
            dispatch_bool(r != 0, [&](auto hr) {
              dispatch_bool(scale != 0, [&](auto hs) {
                dispatch_bool(shift != 0, [&](auto hb) {
                  apply<decltype(dt)::value, decltype(ac)::value, decltype(hr)::value, decltype(hs)::value,
                        decltype(hb)::value>(ptr<void>(x), ptr<void>(r), ptr<float>(scale), ptr<float>(shift),
                                             ptr<void>(y), outer, channels, inner, slope);
                });
              });
            });
          });
        });
      },
      "y = act(scale[c]*x + shift[c] + r); 0 for an absent pointer; y may be x", py::arg("x"), py::arg("residual"),
      py::arg("scale"), py::arg("shift"), py::arg("y"), py::arg("outer"), py::arg("channels"), py::arg("inner"),
      py::arg("activation"), py::arg("slope"), py::arg("dtype"));
  m.def(
      "channel_act_backward_reduce",
      [](int64_t dy, int64_t y, int64_t x, int64_t mean, int64_t dz, int64_t sum_dz, int64_t sum_dz_xmu,
         int64_t outer, int64_t channels, int64_t inner, int act, float slope, int dtype) {
        py::gil_scoped_release nogil;
        dispatch_dtype(dtype, "x", [&](auto dt) {
          dispatch_channel_activation(act, [&](auto ac) {
            dispatch_bool(x != 0, [&](auto hx) {
              dispatch_bool(dz != 0, [&](auto hdz) {
                backward_reduce<decltype(dt)::value, decltype(ac)::value, decltype(hx)::value, decltype(hdz)::value>(
                    ptr<void>(dy), ptr<void>(y), ptr<void>(x), ptr<float>(mean), ptr<void>(dz), ptr<float>(sum_dz),
                    ptr<float>(sum_dz_xmu), outer, channels, inner, slope);
              });
            });
          });
        });
      },
      "dz = act'(y)*dy (written when dz != 0); sum_dz[c] = sum dz, sum_dz_xmu[c] = sum dz*(x - mean[c])",
      py::arg("dy"), py::arg("y"), py::arg("x"), py::arg("mean"), py::arg("dz"), py::arg("sum_dz"),
      py::arg("sum_dz_xmu"), py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("activation"),
      py::arg("slope"), py::arg("dtype"));
  m.def(
      "channel_act_backward_apply",
      [](int64_t dy, int64_t y, int64_t x, int64_t a, int64_t b, int64_t k, int64_t dx, int64_t outer,
         int64_t channels, int64_t inner, int act, float slope, int dtype) {
        py::gil_scoped_release nogil;
        dispatch_dtype(dtype, "x", [&](auto dt) {
          dispatch_channel_activation(act, [&](auto ac) {
            dispatch_bool(b != 0, [&](auto hbk) {
              backward_apply<decltype(dt)::value, decltype(ac)::value, decltype(hbk)::value>(
                  ptr<void>(dy), ptr<void>(y), ptr<void>(x), ptr<float>(a), ptr<float>(b), ptr<float>(k),
                  ptr<void>(dx), outer, channels, inner, slope);
            });
          });
        });
      },
      "dx = a[c]*act'(y)*dy + b[c]*x + k[c] (b = k = 0 when b == 0)", py::arg("dy"), py::arg("y"), py::arg("x"),
      py::arg("a"), py::arg("b"), py::arg("k"), py::arg("dx"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("activation"), py::arg("slope"), py::arg("dtype"));
}
