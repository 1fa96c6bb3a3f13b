// Layout changes of 4-D activations between NCHW and channels_last: per image a 2-D transpose of an [R, K] matrix
// into [K, R] (NCHW → channels_last: R = C, K = H·W; back: R = H·W, K = C), copied as raw 1-, 2-, 4- or 8-byte
// words.
// torch's .contiguous(memory_format=...) moves these one element at a time through its strided iterator. Here each
// task moves a kTile × kTile tile as 8 × 8 blocks transposed in vector registers (4- and 2-byte words; scalar
// edges and 1/8-byte words), so both sides stay in L1 and whole cache lines move; images of C ≤ 4 channels take
// a compiler-vectorised interleave instead.
#include <omp.h>
#include <pybind11/pybind11.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace py = pybind11;

namespace {

constexpr int64_t kTile = 32;                   // 32 × 32 words: 4 KB of fp32 read and written per tile
constexpr int64_t kSerialBytes = 256 * 1024;    // below this one thread: waking the pool costs more than it saves

#if defined(__AVX2__)
// One 8 × 8 block of 4-byte words: rows loaded as vectors, transposed in registers (unpack pairs, then quads, then
// 128-bit halves), stored as the destination's rows.
inline void block8x8(const uint32_t* s, int64_t s_stride, uint32_t* d, int64_t d_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(s + i * s_stride));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + j + 2] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  // r[0..3] hold columns (0, 2, 1, 3) of rows 0-3 in each 128-bit half, r[4..7] the same of rows 4-7
  const int order[4] = {0, 2, 1, 3};
  for (int j = 0; j < 4; ++j) {
    const __m256 lo = _mm256_permute2f128_ps(r[order[j]], r[order[j] + 4], 0x20);
    const __m256 hi = _mm256_permute2f128_ps(r[order[j]], r[order[j] + 4], 0x31);
    _mm256_storeu_ps(reinterpret_cast<float*>(d + j * d_stride), lo);
    _mm256_storeu_ps(reinterpret_cast<float*>(d + (j + 4) * d_stride), hi);
  }
}
// The same for 2-byte words (bf16, fp16): 8 rows of 8 in 128-bit registers, interleaved by 16, 32, then 64 bits.
inline void block8x8(const uint16_t* s, int64_t s_stride, uint16_t* d, int64_t d_stride) {
  __m128i r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * s_stride));
  for (int i = 0; i < 8; i += 2) {  // a[i]: columns 0-3 of rows i, i+1 interleaved; a[i+1]: columns 4-7
    a[i] = _mm_unpacklo_epi16(r[i], r[i + 1]);
    a[i + 1] = _mm_unpackhi_epi16(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4)  // rows h..h+3: b[h + q] holds columns 2q, 2q+1
    for (int q = 0; q < 2; ++q) {
      b[h + 2 * q] = _mm_unpacklo_epi32(a[h + q], a[h + q + 2]);
      b[h + 2 * q + 1] = _mm_unpackhi_epi32(a[h + q], a[h + q + 2]);
    }
  for (int q = 0; q < 4; ++q) {  // column 2q and 2q+1 of all 8 rows
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * q * d_stride), _mm_unpacklo_epi64(b[q], b[q + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (2 * q + 1) * d_stride), _mm_unpackhi_epi64(b[q], b[q + 4]));
  }
}

#endif

template <typename W>
void transpose_tile(const W* __restrict s, W* __restrict d, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                    int64_t k0, int64_t k1) {
  int64_t r_vec = r0, k_vec = k0;
#if defined(__AVX2__)
  if constexpr (sizeof(W) == 4 || sizeof(W) == 2) {
    r_vec = r0 + (r1 - r0) / 8 * 8;
    k_vec = k0 + (k1 - k0) / 8 * 8;
    for (int64_t r = r0; r < r_vec; r += 8)
      for (int64_t k = k0; k < k_vec; k += 8) block8x8(s + r * cols + k, cols, d + k * rows + r, rows);
  }
#endif
  // the edges (and every word size without a vector block): dst[k, r] = src[r, k] one word at a time
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t r = (k < k_vec ? r_vec : r0); r < r1; ++r) d[k * rows + r] = s[r * cols + k];
}

// A few rows (an image's C ≤ 4 planes into channels_last) or a few columns (back): with the count a constant the
// compiler vectorises the interleave (or de-interleave) itself; one task per image and chunk of kChunk words.
constexpr int64_t kChunk = 4096;

template <typename W, int FEW, bool FEW_ROWS>
void transpose_few(const W* __restrict src, W* __restrict dst, int64_t batch, int64_t many) {
  const int64_t chunks = (many + kChunk - 1) / kChunk;
  const bool parallel = batch * many * FEW * int64_t(sizeof(W)) >= kSerialBytes;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < batch * chunks; ++t) {
    const int64_t b = t / chunks, i0 = t % chunks * kChunk, i1 = std::min(many, i0 + kChunk);
    const W* s = src + b * many * FEW;
    W* d = dst + b * many * FEW;
    for (int64_t i = i0; i < i1; ++i)
      for (int f = 0; f < FEW; ++f) {
        if constexpr (FEW_ROWS)
          d[i * FEW + f] = s[f * many + i];  // [FEW, many] → [many, FEW]
        else
          d[f * many + i] = s[i * FEW + f];  // [many, FEW] → [FEW, many]
      }
  }
}

template <typename W, int FEW = 1>
bool try_few(const W* src, W* dst, int64_t batch, int64_t rows, int64_t cols) {
  if constexpr (FEW > 4) {
    return false;
  } else {
    if (rows == FEW) return transpose_few<W, FEW, true>(src, dst, batch, cols), true;
    if (cols == FEW) return transpose_few<W, FEW, false>(src, dst, batch, rows), true;
    return try_few<W, FEW + 1>(src, dst, batch, rows, cols);
  }
}

template <typename W>
void transpose(const W* __restrict src, W* __restrict dst, int64_t batch, int64_t rows, int64_t cols) {
  if (try_few(src, dst, batch, rows, cols)) return;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  const int64_t tiles = batch * row_tiles * col_tiles;
  const bool parallel = batch * rows * cols * int64_t(sizeof(W)) >= kSerialBytes;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t b = t / (row_tiles * col_tiles), rest = t % (row_tiles * col_tiles);
    const int64_t r0 = rest / col_tiles * kTile, k0 = rest % col_tiles * kTile;
    transpose_tile(src + b * rows * cols, dst + b * rows * cols, rows, cols, r0, std::min(rows, r0 + kTile), k0,
                   std::min(cols, k0 + kTile));
  }
}

void batched_transpose(int64_t src, int64_t dst, int64_t batch, int64_t rows, int64_t cols, int word_bytes) {
  py::gil_scoped_release nogil;
  switch (word_bytes) {
    case 1: return transpose(reinterpret_cast<const uint8_t*>(src), reinterpret_cast<uint8_t*>(dst), batch, rows, cols);
    case 2: return transpose(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), batch, rows, cols);
    case 4: return transpose(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst), batch, rows, cols);
    case 8: return transpose(reinterpret_cast<const uint64_t*>(src), reinterpret_cast<uint64_t*>(dst), batch, rows, cols);
  }
  throw std::invalid_argument("batched_transpose: word_bytes must be 1, 2, 4 or 8");
}

}  // namespace

void register_layout(py::module_& m) {
  m.def("batched_transpose", &batched_transpose,
        "dst[b, k, r] = src[b, r, k] for b < batch, r < rows, k < cols: words of word_bytes (1, 2, 4, 8) bytes",
        py::arg("src"), py::arg("dst"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("word_bytes"));
}
