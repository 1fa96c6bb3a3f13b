// y = x·Wᵀ and the input gradient dx = dy·W for few rows (fp32): the GEMMs of dlcore.functional.linear_act on
// the CPU when the batch is small (an AlexNet classifier layer in training: x [16, 9216], W [4096, 9216]). There
// the GEMM is a stream over W with 16 FMAs per weight, and torch's sgemm ran it at 25 GFLOP/s on the 2-core AMD VM
// (46.5 ms for fc6's forward); this kernel runs it at ~78 (15.4 ms).
//
// Tiling: 4 rows of W × 4 rows of x in 16 accumulators of 16 lanes, over all of K (masked tail); threads split W's
// rows, so W is read once from memory, and the x rows (≤ 64 × K floats) stay in L2. Each output is one horizontal
// sum of its accumulator. Tail tiles (N or M not multiples of 4) use the same template with fewer rows.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

#if defined(__AVX512F__)
// f(std::integral_constant<int, R>) for R = min(rows, 4) ≥ 1: a tile's row count as a template argument, so full
// and tail tiles are one template.
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows >= 4 ? 4 : rows) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <int NB, int MB>
void tile(const float* x, const float* w, float* y, int64_t m0, int64_t n0, int64_t N, int64_t K) {
  __m512 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NB], xv[MB];
    for (int i = 0; i < NB; ++i) wv[i] = _mm512_loadu_ps(w + (n0 + i) * K + k);
    for (int j = 0; j < MB; ++j) xv[j] = _mm512_loadu_ps(x + (m0 + j) * K + k);
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_fmadd_ps(wv[i], xv[j], acc[i][j]);
  }
  if (k < K) {  // masked tail: the lanes past K load zeros
    const __mmask16 mask = __mmask16((1u << (K - k)) - 1u);
    __m512 wv[NB], xv[MB];
    for (int i = 0; i < NB; ++i) wv[i] = _mm512_maskz_loadu_ps(mask, w + (n0 + i) * K + k);
    for (int j = 0; j < MB; ++j) xv[j] = _mm512_maskz_loadu_ps(mask, x + (m0 + j) * K + k);
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_fmadd_ps(wv[i], xv[j], acc[i][j]);
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) y[(m0 + j) * N + n0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}

// The rows of W from n0 (nb ≤ 4 of them) against every row of x.
template <int NB>
void w_rows(const float* x, const float* w, float* y, int64_t n0, int64_t M, int64_t N, int64_t K) {
  for (int64_t m0 = 0; m0 < M; m0 += 4)
    with_rows(M - m0, [&](auto mb) { tile<NB, decltype(mb)::value>(x, w, y, m0, n0, N, K); });
}
#endif

// x [M, K], w [N, K], y [M, N], all fp32 row-major contiguous. Returns false when this build has no AVX-512 path
// (the caller then uses torch's GEMM).
bool skinny_linear(int64_t x_addr, int64_t w_addr, int64_t y_addr, int64_t M, int64_t N, int64_t K) {
#if defined(__AVX512F__)
  const auto* x = reinterpret_cast<const float*>(x_addr);
  const auto* w = reinterpret_cast<const float*>(w_addr);
  auto* y = reinterpret_cast<float*>(y_addr);
  const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n0 = 4 * blk;
    with_rows(N - n0, [&](auto nb) { w_rows<decltype(nb)::value>(x, w, y, n0, M, N, K); });
  }
  return true;
#else
  (void)x_addr, (void)w_addr, (void)y_addr, (void)M, (void)N, (void)K;
  return false;
#endif
}

#if defined(__AVX512F__)
// dx rows m0..m0+MB, columns [k0, k0 + 64) (masked past K), over W's rows [n_begin, n_end): acc += dy[m, n]·W[n, k]
// per n (4 loads of W's row piece, MB broadcasts, 4·MB FMAs), then added into dx (zero on entry).
template <int MB>
void grad_x_tile(const float* dy, const float* w, float* dx, int64_t m0, int64_t k0, int64_t n_begin,
                 int64_t n_end, int64_t N, int64_t K, const __mmask16* mask) {
  __m512 acc[MB][4];  // the block's own sum from zero, then added to dx: blocked summation, torch's error size
  for (int j = 0; j < MB; ++j)
    for (int u = 0; u < 4; ++u) acc[j][u] = _mm512_setzero_ps();
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m512 wv[4];
    for (int u = 0; u < 4; ++u) wv[u] = _mm512_maskz_loadu_ps(mask[u], w + n * K + k0 + 16 * u);
    for (int j = 0; j < MB; ++j) {
      const __m512 g = _mm512_set1_ps(dy[(m0 + j) * N + n]);
      for (int u = 0; u < 4; ++u) acc[j][u] = _mm512_fmadd_ps(g, wv[u], acc[j][u]);
    }
  }
  for (int j = 0; j < MB; ++j)
    for (int u = 0; u < 4; ++u) {
      float* out = dx + (m0 + j) * K + k0 + 16 * u;
      _mm512_mask_storeu_ps(out, mask[u], _mm512_add_ps(_mm512_maskz_loadu_ps(mask[u], out), acc[j][u]));
    }
}
#endif

// dx = dy·W: dy [M, N], w [N, K], dx [M, K] (zeroed by the caller); fp32. Threads split K into 64-column pieces;
// each walks W's rows in blocks of 128 (a block's pieces, 32 KB, stay in L1/L2 and its pages in the TLB while every
// group of 4 rows of dy uses them), so W is read from memory once; per block a sum from zero (blocked summation).
// Returns false without an AVX-512 path.
bool skinny_linear_grad_input(int64_t dy_addr, int64_t w_addr, int64_t dx_addr, int64_t M, int64_t N, int64_t K) {
#if defined(__AVX512F__)
  const auto* dy = reinterpret_cast<const float*>(dy_addr);
  const auto* w = reinterpret_cast<const float*>(w_addr);
  auto* dx = reinterpret_cast<float*>(dx_addr);
  constexpr int64_t kRowsPerBlock = 128;
  const int64_t pieces = (K + 63) / 64;
#pragma omp parallel for schedule(static)
  for (int64_t piece = 0; piece < pieces; ++piece) {
    const int64_t k0 = 64 * piece;
    __mmask16 mask[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t left = K - (k0 + 16 * u);
      mask[u] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
    }
    for (int64_t nb = 0; nb < N; nb += kRowsPerBlock) {
      const int64_t ne = nb + kRowsPerBlock < N ? nb + kRowsPerBlock : N;
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        with_rows(M - m0, [&](auto mb) { grad_x_tile<decltype(mb)::value>(dy, w, dx, m0, k0, nb, ne, N, K, mask); });
    }
  }
  return true;
#else
  (void)dy_addr, (void)w_addr, (void)dx_addr, (void)M, (void)N, (void)K;
  return false;
#endif
}

}  // namespace

void register_skinny_linear(py::module_& m) {
  m.def("skinny_linear", &skinny_linear,
        "y = x @ w.T for few rows of x (fp32, contiguous; addresses and sizes); False without an AVX-512 path",
        py::arg("x"), py::arg("w"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("skinny_linear_grad_input", &skinny_linear_grad_input,
        "dx += dy @ w for few rows of dy (fp32, contiguous; dx zeroed by the caller); False without an AVX-512 path",
        py::arg("dy"), py::arg("w"), py::arg("dx"), py::arg("M"), py::arg("N"), py::arg("K"));
}
