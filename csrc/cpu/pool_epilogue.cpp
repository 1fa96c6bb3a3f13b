// The CPU twin's epilogue of conv2d_relu_maxpool2d (dlcore/ops/conv_pool.py): the convolution is torch's (oneDNN,
// no bias), then one pass here. Max and ReLU commute and a per-channel bias is constant in a pooling window, so
//   y = relu(maxpool(z) + b)        and the window's argmax is kept as a byte (its offset kh·KW + kw, < 256);
// backward, one pass: g = dy·[y > 0],  db_c = Σ g,  dz[argmax of each window] += g  (overlapping windows that
// share an argmax add up; dz is zeroed first). Pooling follows torch's max_pool2d: −∞ padding, output size
// floor/ceil((H + 2p − k)/s) + 1 with the last window starting inside the input or its left padding, NaN wins.
// Layout: channels_last ([N, H, W, C]; the launcher converts), one image per backward task, channels vectorised
// in forward. Each backward task owns the dz region it scatters into: no races.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <type_traits>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "common/vec_math.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

struct Geometry {
  int64_t n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw;
};

inline bool better(float v, float best) { return v > best || (std::isnan(v) && !std::isnan(best)); }

// Channels in registers: 16 at a time (a vf of running maxima, a vi of argmax offsets) over the window, then bias,
// ReLU and the stores; a scalar loop for the channel tail. ARG = false (inference: `arg` null) keeps no offsets:
// the blends that track them cost more than the loads (8×64×112×112 → 56×56, 3×3/2: 3.3 ms with offsets).
template <int DT, bool ARG>
void forward_channels_last(const typename Storage<DT>::T* z, const float* bias, typename Storage<DT>::T* y,
                           uint8_t* arg, const Geometry& g) {
  using St = Storage<DT>;
  const int64_t full = g.c / VW * VW;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t i = 0; i < g.oh; ++i)
      for (int64_t j = 0; j < g.ow; ++j) {
        const int64_t h0 = i * g.sh - g.ph, w0 = j * g.sw - g.pw, out = ((n * g.oh + i) * g.ow + j) * g.c;
        const int64_t a0 = std::max<int64_t>(0, -h0), a1 = std::min(g.kh, g.h - h0);
        const int64_t e0 = std::max<int64_t>(0, -w0), e1 = std::min(g.kw, g.w - w0);
        for (int64_t c = 0; c < full; c += VW) {
          vf best = vf{} - INFINITY;
          vi best_k = vi{};
          for (int64_t a = a0; a < a1; ++a)
            for (int64_t e = e0; e < e1; ++e) {
              const auto* px = z + ((n * g.h + h0 + a) * g.w + w0 + e) * g.c + c;
              vf v;
              if constexpr (DT == kF32)
                std::memcpy(&v, px, sizeof(vf));  // one vector load (the element loop did not become one)
              else
                for (int l = 0; l < VW; ++l) v[l] = St::load(px[l]);
              const vi take = (v > best) | ((v != v) & (best == best));
              best = take ? v : best;
              if (ARG) best_k = take ? (vi{} + int(a * g.kw + e)) : best_k;
            }
          vf b = {};
          if (bias) std::memcpy(&b, bias + c, sizeof(vf));
          const vf o = best + b;
          const vf r = (o > 0.f) | (o != o) ? o : vf{};
          for (int l = 0; l < VW; ++l) {
            y[out + c + l] = St::store(r[l]);
            if (ARG) arg[out + c + l] = uint8_t(best_k[l]);
          }
        }
        for (int64_t c = full; c < g.c; ++c) {
          float best = -INFINITY;
          int best_k = 0;
          for (int64_t a = a0; a < a1; ++a)
            for (int64_t e = e0; e < e1; ++e) {
              const float v = St::load(z[((n * g.h + h0 + a) * g.w + w0 + e) * g.c + c]);
              if (better(v, best)) best = v, best_k = int(a * g.kw + e);
            }
          const float o = best + (bias ? bias[c] : 0.f);
          y[out + c] = St::store(o > 0.f || std::isnan(o) ? o : 0.f);
          if (ARG) arg[out + c] = uint8_t(best_k);
        }
      }
}

// g = dy·[y > 0]; db (per-thread partials in double, combined in thread order); dz zeroed, then scattered into.
template <int DT>
void backward(const typename Storage<DT>::T* dy, const typename Storage<DT>::T* y, const uint8_t* arg,
              typename Storage<DT>::T* dz, float* grad_bias, const Geometry& g) {
  using St = Storage<DT>;
  const int threads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(threads * g.c), 0.0);
  const size_t plane_bytes = sizeof(typename St::T) * size_t(g.h * g.w);
#pragma omp parallel num_threads(threads)
  {
    double* acc = partial.data() + size_t(omp_get_thread_num()) * size_t(g.c);
    {
      std::vector<float> sums(static_cast<size_t>(g.c));
#pragma omp for schedule(static)
      for (int64_t n = 0; n < g.n; ++n) {
        auto* image = dz + n * g.h * g.w * g.c;
        std::memset(static_cast<void*>(image), 0, plane_bytes * size_t(g.c));
        std::fill(sums.begin(), sums.end(), 0.f);
        for (int64_t i = 0; i < g.oh; ++i)
          for (int64_t j = 0; j < g.ow; ++j) {
            const int64_t o = ((n * g.oh + i) * g.ow + j) * g.c;
            for (int64_t c = 0; c < g.c; ++c) {
              const float grad = St::load(y[o + c]) > 0.f ? St::load(dy[o + c]) : 0.f;
              sums[c] += grad;
              const int k = arg[o + c];
              const int64_t hh = i * g.sh - g.ph + k / g.kw, ww = j * g.sw - g.pw + k % g.kw;
              auto& cell = image[(hh * g.w + ww) * g.c + c];
              cell = St::store(St::load(cell) + grad);
            }
          }
        for (int64_t c = 0; c < g.c; ++c) acc[c] += sums[c];
      }
    }
  }
  if (grad_bias)
    for (int64_t c = 0; c < g.c; ++c) {
      double s = 0.0;
      for (int t = 0; t < threads; ++t) s += partial[size_t(t) * size_t(g.c) + size_t(c)];
      grad_bias[c] = float(s);
    }
}

Geometry geometry(const py::tuple& t) {
  if (t.size() != 12) throw std::invalid_argument("dlcore: pool geometry needs 12 integers");
  Geometry g;
  int64_t* fields[] = {&g.n, &g.c, &g.h, &g.w, &g.oh, &g.ow, &g.kh, &g.kw, &g.sh, &g.sw, &g.ph, &g.pw};
  for (size_t i = 0; i < 12; ++i) *fields[i] = t[i].cast<int64_t>();
  if (g.kh * g.kw > 256) throw std::invalid_argument("dlcore: pooling windows of more than 256 elements");
  return g;
}

}  // namespace

void register_pool_epilogue(py::module_& m) {
  m.def(
      "maxpool_bias_relu_forward",
      [](int64_t z, int64_t bias, int64_t y, int64_t arg, py::tuple geom, int dtype) {
        const Geometry g = geometry(geom);
        py::gil_scoped_release nogil;
        dispatch_dtype(dtype, "z", [&](auto dt) {
          constexpr int DT = decltype(dt)::value;
          using T = typename Storage<DT>::T;
          auto run = [&](auto with_arg) {
            forward_channels_last<DT, decltype(with_arg)::value>(reinterpret_cast<const T*>(z),
                                                                 reinterpret_cast<const float*>(bias),
                                                                 reinterpret_cast<T*>(y),
                                                                 reinterpret_cast<uint8_t*>(arg), g);
          };
          if (arg)
            run(std::true_type{});
          else
            run(std::false_type{});
        });
      },
      "channels_last: y = relu(maxpool(z) + bias[c]), argmax offsets as bytes (argmax 0: none kept); geometry (N, C, H, W, OH, OW, kH, kW, sH, sW, pH, pW)",
      py::arg("z"), py::arg("bias"), py::arg("y"), py::arg("argmax"), py::arg("geometry"), py::arg("dtype"));
  m.def(
      "maxpool_bias_relu_backward",
      [](int64_t dy, int64_t y, int64_t arg, int64_t dz, int64_t grad_bias, py::tuple geom, int dtype) {
        const Geometry g = geometry(geom);
        py::gil_scoped_release nogil;
        dispatch_dtype(dtype, "dy", [&](auto dt) {
          constexpr int DT = decltype(dt)::value;
          using T = typename Storage<DT>::T;
          backward<DT>(reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(y),
                       reinterpret_cast<const uint8_t*>(arg), reinterpret_cast<T*>(dz),
                       reinterpret_cast<float*>(grad_bias), g);
        });
      },
      "dz (zeroed, then dy*[y > 0] added at each window's argmax) and grad_bias[c] = sum of dy*[y > 0]",
      py::arg("dy"), py::arg("y"), py::arg("argmax"), py::arg("dz"), py::arg("grad_bias"), py::arg("geometry"),
      py::arg("dtype"));
}
