// The CPU twin of dlcore's fused additive (Bahdanau) attention (dlcore/ops/additive_attention.py), fp32, OpenMP
// over the batch. Per batch row b, with s = ws[b] (W·s_t, [A]), u_j = uh[b, j] (U·h_j, [A]), keys j < len[b]:
//   forward:  t_j = tanh(s + u_j),  e_j = v·t_j,  α = softmax(e),  c = Σ_j α_j h_j        (no [S, A] tensor kept)
//   backward: dα_j = dc·h_j,  de_j = α_j (dα_j − Σ_k α_k dα_k),  dh_j = α_j dc,
//             dpre_j = de_j · v ∘ (1 − t_j²)  (t_j recomputed),  duh_j = dpre_j,  dws = Σ_j dpre_j,
//             dv = Σ_b Σ_j de_j t_j (per-thread partials, combined in thread order).
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/rows.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

struct Shapes {
  int64_t B, S, A, D;
};

inline vf load_vf(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store_vf(float* p, vf x) { std::memcpy(p, &x, sizeof x); }

// e_j for j < n into e, and t_j rows into t when given ([n, A] scratch). Whole 16-float vectors, then a tail
// vector built lane by lane (its unused lanes hold tanh(0) · 0 = 0).
inline void scores(const float* s, const float* uh, const float* v, int64_t n, int64_t A, float* e, float* t) {
  const int64_t full = A / VW * VW;
  for (int64_t j = 0; j < n; ++j) {
    const float* u = uh + j * A;
    float* tj = t ? t + j * A : nullptr;
    vf acc = {};
    for (int64_t a = 0; a < full; a += VW) {
      const vf th = tanhv(load_vf(s + a) + load_vf(u + a));
      acc += load_vf(v + a) * th;
      if (tj) store_vf(tj + a, th);
    }
    if (full < A) {
      vf x = {}, w = {};
      for (int64_t l = 0; l < A - full; ++l) x[l] = s[full + l] + u[full + l], w[l] = v[full + l];
      const vf th = tanhv(x);
      acc += w * th;
      if (tj)
        for (int64_t l = 0; l < A - full; ++l) tj[full + l] = th[l];
    }
    e[j] = sum_lanes(acc);
  }
}

inline void softmax(float* e, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = e[j] > m ? e[j] : m;
  float z = 0.f;
  for (int64_t j = 0; j < n; ++j) z += (e[j] = std::exp(e[j] - m));
  for (int64_t j = 0; j < n; ++j) e[j] /= z;
}

void forward(const float* ws, const float* uh, const float* v, const float* h, const int64_t* len, float* ctx,
             float* alpha, Shapes p) {
#pragma omp parallel
  {
    std::vector<float> e(static_cast<size_t>(p.S));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t n = len[b];
      scores(ws + b * p.A, uh + b * p.S * p.A, v, n, p.A, e.data(), nullptr);
      softmax(e.data(), n);
      float* c = ctx + b * p.D;
      for (int64_t d = 0; d < p.D; ++d) c[d] = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float* hj = h + (b * p.S + j) * p.D;
#pragma omp simd
        for (int64_t d = 0; d < p.D; ++d) c[d] += e[size_t(j)] * hj[d];
      }
      float* al = alpha + b * p.S;
      for (int64_t j = 0; j < p.S; ++j) al[j] = j < n ? e[size_t(j)] : 0.f;
    }
  }
}

void backward(const float* dc, const float* ws, const float* uh, const float* v, const float* h, const int64_t* len,
              const float* alpha, float* dws, float* duh, float* dv, float* dh, Shapes p) {
  const int threads = omp_get_max_threads();
  ColumnPartials pv(threads, p.A);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> t(static_cast<size_t>(p.S * p.A)), de(static_cast<size_t>(p.S));
    float* accv = pv.of_thread(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t n = len[b];
      const float* al = alpha + b * p.S;
      const float* g = dc + b * p.D;
      scores(ws + b * p.A, uh + b * p.S * p.A, v, n, p.A, de.data(), t.data());  // de: scratch for e, then reused
      float weighted = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float* hj = h + (b * p.S + j) * p.D;
        float* dhj = dh + (b * p.S + j) * p.D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < p.D; ++d) {
          dot += g[d] * hj[d];
          dhj[d] = al[j] * g[d];
        }
        de[size_t(j)] = dot;  // dα_j
        weighted += al[j] * dot;
      }
      for (int64_t j = n; j < p.S; ++j)
        for (int64_t d = 0; d < p.D; ++d) dh[(b * p.S + j) * p.D + d] = 0.f;
      float* dw = dws + b * p.A;
      for (int64_t a = 0; a < p.A; ++a) dw[a] = 0.f;
      for (int64_t j = 0; j < p.S; ++j) {
        float* du = duh + (b * p.S + j) * p.A;
        if (j >= n) {
          for (int64_t a = 0; a < p.A; ++a) du[a] = 0.f;
          continue;
        }
        const float dej = al[j] * (de[size_t(j)] - weighted);
        const float* tj = t.data() + j * p.A;
#pragma omp simd
        for (int64_t a = 0; a < p.A; ++a) {
          const float pre = dej * v[a] * (1.f - tj[a] * tj[a]);
          du[a] = pre;
          dw[a] += pre;
          accv[a] += dej * tj[a];
        }
      }
    }
  }
  pv.reduce_into(dv);
}

}  // namespace

void register_additive_attention(py::module_& m) {
  m.def("additive_attention_forward", [](int64_t ws, int64_t uh, int64_t v, int64_t h, int64_t len, int64_t ctx,
                                         int64_t alpha, int64_t B, int64_t S, int64_t A, int64_t D) {
    forward(reinterpret_cast<const float*>(ws), reinterpret_cast<const float*>(uh), reinterpret_cast<const float*>(v),
            reinterpret_cast<const float*>(h), reinterpret_cast<const int64_t*>(len), reinterpret_cast<float*>(ctx),
            reinterpret_cast<float*>(alpha), Shapes{B, S, A, D});
  }, "context, alpha of v·tanh(ws + uh) attention (fp32; lengths int64 in [1, S])");
  m.def("additive_attention_backward", [](int64_t dc, int64_t ws, int64_t uh, int64_t v, int64_t h, int64_t len,
                                          int64_t alpha, int64_t dws, int64_t duh, int64_t dv, int64_t dh, int64_t B,
                                          int64_t S, int64_t A, int64_t D) {
    backward(reinterpret_cast<const float*>(dc), reinterpret_cast<const float*>(ws),
             reinterpret_cast<const float*>(uh), reinterpret_cast<const float*>(v), reinterpret_cast<const float*>(h),
             reinterpret_cast<const int64_t*>(len), reinterpret_cast<const float*>(alpha),
             reinterpret_cast<float*>(dws), reinterpret_cast<float*>(duh), reinterpret_cast<float*>(dv),
             reinterpret_cast<float*>(dh), Shapes{B, S, A, D});
  }, "gradients of additive attention's context (fp32)");
}
