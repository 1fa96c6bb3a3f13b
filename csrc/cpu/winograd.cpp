// Winograd F(4×4, 3×3) transforms for 3×3, stride-1 convolutions in inference (Lavin & Gray, 2015): the `cpu`
// path of dlcore/ops/winograd.py, which holds the math and the GEMM between these two passes.
//
// A 6×6 input tile d gives a 4×4 output tile y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A for one (input, output) channel pair;
// summed over input channels, the elementwise product becomes, for each of the 36 tile positions, a GEMM
// [tiles × C_in] @ [C_in × C_out]: 4 multiplies per output instead of 9 (torch.bmm runs it, between the passes here).
//   input pass   V[k][m][c] = (Bᵀ d_{m,c} B)[k]        k = 6·i + j, m = tile (image, tile row, tile column)
//   output pass  y[n, 4·th + a, 4·tw + b, o] = act((Aᵀ M_{m,o} A)[a][b] + bias[o] + residual[...])
// Both passes run over channels innermost (channels_last activations, 64-byte vectors of channels) and over tiles in
// parallel; tiles past the image read zeros (padding) and write nothing.
//
// Bᵀ and Aᵀ for the points 0, 1, −1, 2, −1/2, ∞ (dlcore/ops/winograd.py has them as tables, and why these
// points); bt6 and at6 below are their rows written out:
//   Bᵀ [1  1.5  -2   -1.5  1   0]       Aᵀ [1  1   1  1   1      0]
//      [0  -1   -2.5 -0.5  1   0]          [0  1  -1  2  -0.5    0]
//      [0   1    0.5 -2.5  1   0]          [0  1   1  4   0.25   0]
//      [0  -0.5 -1    0.5  1   0]          [0  1  -1  8  -0.125  1]
//      [0   2   -1   -2    1   0]
//      [0   1    1.5 -2   -1.5 1]
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace py = pybind11;

namespace {

// One vector of 64 bytes (16 fp32 or 8 fp64 channels) as a GCC vector type: the compiler emits AVX-512, AVX2
// halves or scalar code for whatever -march the extension is built with.
template <typename T>
struct Lanes {
  using V [[gnu::vector_size(64)]] = T;
  static constexpr int kCount = 64 / sizeof(T);
};

// Bᵀ applied to 6 vectors (one axis of a tile), in place.
template <typename V>
inline void bt6(V (&d)[6]) {
  const V d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3], d4 = d[4], d5 = d[5];
  d[0] = d0 + 1.5f * (d1 - d3) - 2 * d2 + d4;
  d[1] = d4 - d1 - 2.5f * d2 - 0.5f * d3;
  d[2] = d1 + 0.5f * d2 - 2.5f * d3 + d4;
  d[3] = 0.5f * (d3 - d1) - d2 + d4;
  d[4] = 2 * (d1 - d3) - d2 + d4;
  d[5] = d1 + 1.5f * (d2 - d4) - 2 * d3 + d5;
}

// Aᵀ applied to 6 vectors: 4 results.
template <typename V>
inline void at6(const V (&m)[6], V (&r)[4]) {
  const V s12 = m[1] + m[2], d12 = m[1] - m[2];
  r[0] = s12 + m[0] + m[3] + m[4];
  r[1] = d12 + 2 * m[3] - 0.5f * m[4];
  r[2] = s12 + 4 * m[3] + 0.25f * m[4];
  r[3] = d12 + 8 * m[3] - 0.125f * m[4] + m[5];
}

// n ≤ kCount lanes between memory and a vector; lanes past n read as 0 and are not written.
template <typename T, typename V = typename Lanes<T>::V>
inline V load(const T* src, int n) {
  V v;
  if (n == Lanes<T>::kCount) {
    std::memcpy(&v, src, sizeof(V));
  } else {
    v = V{};
    for (int l = 0; l < n; ++l) v[l] = src[l];
  }
  return v;
}

template <typename T, typename V>
inline void store(T* dst, const V& v, int n) {
  if (n == Lanes<T>::kCount)
    std::memcpy(dst, &v, sizeof(V));
  else
    for (int l = 0; l < n; ++l) dst[l] = v[l];
}

struct Tile {
  int64_t image, row, col;  // the tile's image and its first output row and column
};

struct Geometry {
  int64_t n, h, w, c;          // input (channels_last) or output (channels_last) extents
  int64_t pad_h, pad_w;        // input only: zero rows/columns before the image
  int64_t tiles_h, tiles_w;    // 4×4 output tiles per image

  // tiles are numbered image by image, row by row
  Tile at(int64_t tile) const {
    const int64_t per_image = tiles_h * tiles_w, rest = tile % per_image;
    return {tile / per_image, 4 * (rest / tiles_w), 4 * (rest % tiles_w)};
  }
};

// f(m, tile) for m in [0, count) (tile first + m), over OpenMP threads.
template <typename F>
void for_each_tile(const Geometry& g, int64_t first, int64_t count, F&& f) {
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < count; ++m) f(m, g.at(first + m));
}

// V[k][m - first][c] for tiles m in [first, first + count).
template <typename T>
void input_pass(const T* x, T* v, const Geometry& g, int64_t first, int64_t count) {
  using V = typename Lanes<T>::V;
  constexpr int kLanes = Lanes<T>::kCount;
  const int64_t C = g.c;
  for_each_tile(g, first, count, [&](int64_t m, const Tile& tile) {
    const int64_t row0 = tile.row - g.pad_h, col0 = tile.col - g.pad_w;  // the 6×6 window's corner in x
    const T* image = x + tile.image * g.h * g.w * C;
    bool row_in[6], col_in[6];
    for (int i = 0; i < 6; ++i) {
      row_in[i] = row0 + i >= 0 && row0 + i < g.h;
      col_in[i] = col0 + i >= 0 && col0 + i < g.w;
    }
    for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
      const int n = int(std::min<int64_t>(kLanes, C - c0));
      V t[6][6];  // t[i][j]: Bᵀ d down each column j, then Bᵀ along each row i
      for (int j = 0; j < 6; ++j) {
        V col[6];
        for (int i = 0; i < 6; ++i)
          col[i] = row_in[i] && col_in[j] ? load(image + ((row0 + i) * g.w + col0 + j) * C + c0, n) : V{};
        bt6(col);
        for (int i = 0; i < 6; ++i) t[i][j] = col[i];
      }
      for (int i = 0; i < 6; ++i) {
        bt6(t[i]);
        for (int j = 0; j < 6; ++j) store(v + ((6 * i + j) * count + m) * C + c0, t[i][j], n);
      }
    }
  });
}

// y tiles [first, first + count) from M[k][m - first][o]: Aᵀ M A, + bias, + residual, ReLU.
template <typename T>
void output_pass(const T* mm, T* y, const T* bias, const T* residual, const Geometry& g, int64_t first,
                 int64_t count, bool relu) {
  using V = typename Lanes<T>::V;
  constexpr int kLanes = Lanes<T>::kCount;
  const int64_t K = g.c;
  for_each_tile(g, first, count, [&](int64_t m, const Tile& tile) {
    const int64_t row0 = tile.row, col0 = tile.col;
    const int rows = int(std::min<int64_t>(4, g.h - row0)), cols = int(std::min<int64_t>(4, g.w - col0));
    for (int64_t o0 = 0; o0 < K; o0 += kLanes) {
      const int n = int(std::min<int64_t>(kLanes, K - o0));
      const V b = bias ? load(bias + o0, n) : V{};
      V t[4][6];  // Aᵀ down each column j
      for (int j = 0; j < 6; ++j) {
        V col[6], out[4];
        for (int i = 0; i < 6; ++i) col[i] = load(mm + ((6 * i + j) * count + m) * K + o0, n);
        at6(col, out);
        for (int a = 0; a < 4; ++a) t[a][j] = out[a];
      }
      for (int a = 0; a < rows; ++a) {
        V out[4];
        at6(t[a], out);
        for (int c = 0; c < cols; ++c) {
          const int64_t at = ((tile.image * g.h + row0 + a) * g.w + col0 + c) * K + o0;
          V value = out[c] + b;
          if (residual) value += load(residual + at, n);
          if (relu) value = value < 0 ? V{} : value;  // a NaN stays NaN, as in torch.relu
          store(y + at, value, n);
        }
      }
    }
  });
}

template <typename T>
const T* ptr(int64_t addr) {
  return reinterpret_cast<const T*>(addr);
}

}  // namespace

void register_winograd(py::module_& m) {
  m.def(
      "winograd_input",
      [](int64_t x, int64_t v, int64_t n, int64_t h, int64_t w, int64_t c, int64_t pad_h, int64_t pad_w,
         int64_t tiles_h, int64_t tiles_w, int64_t first, int64_t count, bool fp64) {
        const Geometry g{n, h, w, c, pad_h, pad_w, tiles_h, tiles_w};
        py::gil_scoped_release unlocked;
        if (fp64)
          input_pass(ptr<double>(x), reinterpret_cast<double*>(v), g, first, count);
        else
          input_pass(ptr<float>(x), reinterpret_cast<float*>(v), g, first, count);
      },
      "Winograd F(4x4,3x3) input pass: x channels_last [n, h, w, c] -> V [36, count, c] for tiles [first, "
      "first + count) (fp32, or fp64 when fp64)",
      py::arg("x"), py::arg("v"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("c"), py::arg("pad_h"),
      py::arg("pad_w"), py::arg("tiles_h"), py::arg("tiles_w"), py::arg("first"), py::arg("count"),
      py::arg("fp64"));
  m.def(
      "winograd_output",
      [](int64_t mm, int64_t y, int64_t bias, int64_t residual, int64_t n, int64_t h, int64_t w, int64_t k,
         int64_t tiles_h, int64_t tiles_w, int64_t first, int64_t count, bool relu, bool fp64) {
        const Geometry g{n, h, w, k, 0, 0, tiles_h, tiles_w};
        py::gil_scoped_release unlocked;
        if (fp64)
          output_pass(ptr<double>(mm), reinterpret_cast<double*>(y), ptr<double>(bias), ptr<double>(residual), g,
                      first, count, relu);
        else
          output_pass(ptr<float>(mm), reinterpret_cast<float*>(y), ptr<float>(bias), ptr<float>(residual), g, first,
                      count, relu);
      },
      "Winograd F(4x4,3x3) output pass: M [36, count, k] -> y channels_last [n, h, w, k] for tiles [first, "
      "first + count), + bias (0: none), + residual (0: none, else like y), ReLU when relu",
      py::arg("m"), py::arg("y"), py::arg("bias"), py::arg("residual"), py::arg("n"), py::arg("h"), py::arg("w"),
      py::arg("k"), py::arg("tiles_h"), py::arg("tiles_w"), py::arg("first"), py::arg("count"), py::arg("relu"),
      py::arg("fp64"));
}
