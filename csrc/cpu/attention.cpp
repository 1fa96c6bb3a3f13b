// The CPU twin of dlcore's flash attention (dlcore/ops/attention.py): the tiled FlashAttention-2 algorithm, never
// forming the L×S matrix. Tiles of BM query rows × BN keys are packed into fp32 buffers (bf16/fp16 converted on the
// way in; head dim zero-padded to a multiple of 16), multiplied by two register-blocked micro-kernels written with
// GCC vector types (AVX-512 here, two AVX2 halves elsewhere), with an exact-enough polynomial exp2 so that the
// softmax loops vectorise too.
//   forward:  per (b, h, query tile), OpenMP over all of them: online softmax in base 2, O += P·V; up to
//             kDecodeRows query rows (decoding), per (b, h, row) one score row at once from the unpacked inputs.
//   backward: per (b, kv head), OpenMP over those: for each key tile, for each query head of the group and each
//             query tile: S, P, dP = dO·Vᵀ, dV += Pdᵀ·dO, dS = P∘(dP − Δ), dK += dSᵀ·Q, dQ += dS·K (dQ kept in fp32
//             for the whole task). One pass, no atomics: deterministic.
// Masks, window, key lengths, bias and Philox dropout follow the launcher contract in dlcore/ops/attention.py.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/philox.h"
#include "common/vec_math.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

constexpr int BM = 64;  // query rows per tile
constexpr int BN = 64;  // keys per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using Strides3 = std::array<int64_t, 3>;
using Strides4 = std::array<int64_t, 4>;

struct Problem {
  int64_t B, H, HK, LQ, LK, D, Dp;
  Strides3 sq, sk, sv;
  Strides4 sb;
  const void* bias;
  const int32_t* klen;
  float scale;
  int64_t win_l, win_r;
  uint64_t seed, threshold;
  float drop_scale;
  int64_t key_len(int64_t b) const { return klen ? std::min<int64_t>(klen[b], LK) : LK; }
  // the key range [lo, hi) query rows [r0, r1) can see
  void key_range(int64_t r0, int64_t r1, int64_t b, int64_t& lo, int64_t& hi) const {
    hi = key_len(b);
    if (win_r >= 0) hi = std::min(hi, r1 - 1 + win_r + 1);
    lo = win_l >= 0 ? std::max<int64_t>(0, r0 - win_l) : 0;
  }
};

// One score row of BN values (aligned): row ← 2^(row − shift), returning the row's sum as 16 lane partials
// (reduced once per row at the end, not per tile).
inline vf exp2_row(float* row, float shift) {
  vf* v = reinterpret_cast<vf*>(row);
  vf sum = {};
#pragma GCC unroll 4
  for (int c = 0; c < BN / VW; ++c) {
    v[c] = exp2v(v[c] - shift);
    sum += v[c];
  }
  return sum;
}

// max(init, row[0..BN)) by a shuffle tree
inline float max_row(const float* row, float init) {
  const vf* v = reinterpret_cast<const vf*>(row);
  vf m = vmax(vmax(v[0], v[1]), vmax(v[2], v[3]));
  m = vmax(m, __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  m = vmax(m, __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  m = vmax(m, __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  m = vmax(m, __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return std::max(init, m[0]);
}



// Register blocks of kRows rows × 64 columns: 6 × 4 AVX-512 accumulators leave room for the operands in the 32
// zmm registers (measured: ~4% faster than 4 rows here); with 16 AVX2 registers, 4 rows. kRows-row blocks go in
// pairs so that what is left of a multiple of 4 rows is a multiple of 4.
#if defined(__AVX512F__)
constexpr int kRows = 6;
#else
constexpr int kRows = 4;
#endif

// C[rows][BN] = A[rows][Dp] · Bt[Dp][BN]  (rows rounded up to 4; A zero-padded to that)
template <int R>
inline void gemm_abt_rows(const float* A, const float* Bt, float* C, int Dp) {
  vf acc[R][BN / VW] = {};
  for (int d = 0; d < Dp; ++d) {
    const vf* b = reinterpret_cast<const vf*>(Bt + d * BN);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float a = A[r * Dp + d];
#pragma GCC unroll 4
      for (int c = 0; c < BN / VW; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < BN / VW; ++c) reinterpret_cast<vf*>(C + r * BN)[c] = acc[r][c];
}
void gemm_abt(const float* A, const float* Bt, float* C, int rows, int Dp) {
  int i = 0;
  for (const int paired = rows / (2 * kRows) * (2 * kRows); i < paired; i += kRows)
    gemm_abt_rows<kRows>(A + i * Dp, Bt, C + i * BN, Dp);
  for (; i < rows; i += 4) gemm_abt_rows<4>(A + i * Dp, Bt, C + i * BN, Dp);
}

// C[m][Dp] += Σ_n A(m, n) · Bm[n][Dp] for m < rows (multiple of 4), n < inner; A(m, n) = A[m·sam + n·san].
template <int R, int NV>
inline void gemm_acc_block(const float* A, int64_t sam, int64_t san, const float* Bm, float* C, int inner, int Dp,
                           int col) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = reinterpret_cast<const vf*>(C + r * Dp + col)[c];
  for (int n = 0; n < inner; ++n) {
    const vf* b = reinterpret_cast<const vf*>(Bm + n * Dp + col);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float a = A[r * sam + n * san];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) reinterpret_cast<vf*>(C + r * Dp + col)[c] = acc[r][c];
}

template <int NV>
void gemm_acc_chunk(const float* A, int64_t sam, int64_t san, const float* Bm, float* C, int rows, int inner,
                    int Dp, int col) {
  int m = 0;
  for (const int paired = rows / (2 * kRows) * (2 * kRows); m < paired; m += kRows)
    gemm_acc_block<kRows, NV>(A + m * sam, sam, san, Bm, C + m * Dp, inner, Dp, col);
  for (; m < rows; m += 4) gemm_acc_block<4, NV>(A + m * sam, sam, san, Bm, C + m * Dp, inner, Dp, col);
}

void gemm_acc(const float* A, int64_t sam, int64_t san, const float* Bm, float* C, int rows, int inner, int Dp) {
  int col = 0;
  for (; col + 4 * VW <= Dp; col += 4 * VW) gemm_acc_chunk<4>(A, sam, san, Bm, C, rows, inner, Dp, col);
  switch ((Dp - col) / VW) {
    case 3: gemm_acc_chunk<3>(A, sam, san, Bm, C, rows, inner, Dp, col); break;
    case 2: gemm_acc_chunk<2>(A, sam, san, Bm, C, rows, inner, Dp, col); break;
    case 1: gemm_acc_chunk<1>(A, sam, san, Bm, C, rows, inner, Dp, col); break;
    default: break;
  }
}

inline int round4(int64_t n) { return int((n + 3) & ~int64_t(3)); }

// Pack rows [r0, r0+n) of one head (row stride rs) into dst[BM or BN][Dp] (fp32, zero-padded), times mul.
template <int DT>
void pack_rows(const void* base, int64_t rs, int64_t r0, int64_t n, int64_t D, int64_t Dp, int rows_out,
               float* dst, float mul = 1.0f) {
  using S = Storage<DT>;
  const auto* src = reinterpret_cast<const typename S::T*>(base);
  for (int r = 0; r < rows_out; ++r) {
    float* out = dst + r * Dp;
    if (r < n) {
      const auto* row = src + (r0 + r) * rs;
      for (int64_t d = 0; d < D; ++d) out[d] = S::load(row[d]) * mul;
      for (int64_t d = D; d < Dp; ++d) out[d] = 0.0f;
    } else {
      std::fill(out, out + Dp, 0.0f);
    }
  }
}

// One butterfly stage of a 16×16 transpose: rows i and i + S exchange the S-wide column blocks that differ in
// the bit S (element (row, col) moves to (row with that bit taken from col, col with it taken from row)).
template <int S, int... I>
inline void swap_bit(vf& lo, vf& hi, std::integer_sequence<int, I...>) {
  const vf a = lo, b = hi;
  lo = __builtin_shufflevector(a, b, ((I & S) ? 16 + I - S : I)...);
  hi = __builtin_shufflevector(a, b, ((I & S) ? 16 + I : I + S)...);
}

template <int S>
inline void transpose_stage(vf (&r)[VW]) {
  for (int i = 0; i < VW; ++i)
    if (!(i & S)) swap_bit<S>(r[i], r[i + S], std::make_integer_sequence<int, VW>{});
}

// Pack keys [c0, c0+n) transposed into dst[Dp][BN] (zero-padded): 16×16 blocks through registers (four
// butterfly stages of two-source shuffles), the ragged edges element by element.
template <int DT>
void pack_cols(const void* base, int64_t rs, int64_t c0, int64_t n, int64_t D, int64_t Dp, float* dst) {
  using S = Storage<DT>;
  const auto* src = reinterpret_cast<const typename S::T*>(base);
  std::fill(dst, dst + Dp * BN, 0.0f);
  const int64_t n16 = n / VW * VW, d16 = D / VW * VW;
  for (int64_t cb = 0; cb < n16; cb += VW)
    for (int64_t db = 0; db < d16; db += VW) {
      vf r[VW];
      for (int c = 0; c < VW; ++c) {
        const auto* row = src + (c0 + cb + c) * rs + db;
        if constexpr (DT == kF32) {
          std::memcpy(&r[c], row, sizeof(vf));
        } else {
          for (int d = 0; d < VW; ++d) r[c][d] = S::load(row[d]);
        }
      }
      transpose_stage<1>(r);
      transpose_stage<2>(r);
      transpose_stage<4>(r);
      transpose_stage<8>(r);
      for (int d = 0; d < VW; ++d) *reinterpret_cast<vf*>(dst + (db + d) * BN + cb) = r[d];
    }
  for (int64_t c = 0; c < n; ++c) {
    const auto* row = src + (c0 + c) * rs;
    for (int64_t d = c < n16 ? d16 : 0; d < D; ++d) dst[d * BN + c] = S::load(row[d]);
  }
}

// Scores of one tile in log2 units: S ← S·scale·log2e + bias·log2e, -inf where hidden (rows and cols beyond the
// problem too). `prescaled`: Q was packed already multiplied by scale·log2e (the forward), so only bias and masks.
template <int DT>
void mask_scores(const Problem& p, float* S, int64_t b, int64_t h, int64_t r0, int64_t nr, int64_t c0,
                 int64_t klen, bool prescaled = false) {
  using St = Storage<DT>;
  const float scale_log2 = prescaled ? 1.0f : p.scale * kLog2e;
  const bool interior = nr == BM && c0 + BN <= klen && (p.win_r < 0 || c0 + BN - 1 <= r0 + p.win_r) &&
                        (p.win_l < 0 || c0 >= r0 + BM - 1 - p.win_l);
  if (prescaled && interior && !p.bias) return;  // every score visible, nothing to add
  const auto* bias = reinterpret_cast<const typename St::T*>(p.bias);
  for (int r = 0; r < BM; ++r) {
    float* row = S + r * BN;
    const int64_t i = r0 + r;
    int64_t hi = std::min<int64_t>(klen, c0 + BN);
    if (p.win_r >= 0) hi = std::min(hi, i + p.win_r + 1);
    int64_t lo = c0;
    if (p.win_l >= 0) lo = std::max(lo, i - p.win_l);
    if (r >= nr) hi = lo;  // padding row
    const int jlo = int(std::clamp<int64_t>(lo - c0, 0, BN)), jhi = int(std::clamp<int64_t>(hi - c0, 0, BN));
    if (bias) {
      const auto* brow = bias + b * p.sb[0] + h * p.sb[1] + i * p.sb[2] + c0 * p.sb[3];
      for (int j = jlo; j < jhi; ++j) row[j] = row[j] * scale_log2 + St::load(brow[j * p.sb[3]]) * kLog2e;
    } else if (!prescaled) {
#pragma omp simd
      for (int j = jlo; j < jhi; ++j) row[j] *= scale_log2;
    }
    for (int j = 0; j < jlo; ++j) row[j] = kNegInf;
    for (int j = std::max(jhi, jlo); j < BN; ++j) row[j] = kNegInf;
  }
}

// One thread's tiles (64-byte aligned): q [BM][Dp], kt [Dp][BN], vb [BN][Dp], acc [BM][Dp], rows [BM][Dp] (dO),
// pd [BM][BN] (dropped probabilities), s: two [BM][BN] tiles.
struct Buffers {
  std::vector<vf> store;
  float *q, *kt, *vb, *acc, *rows, *pd, *s;
  explicit Buffers(int64_t Dp) : store(size_t((5 * BM * Dp + 3 * BM * BN) / VW)) {
    q = reinterpret_cast<float*>(store.data());
    kt = q + BM * Dp;
    vb = kt + BN * Dp;
    acc = vb + BN * Dp;
    rows = acc + BM * Dp;
    pd = rows + BM * Dp;
    s = pd + BM * BN;
  }
};

// Scratch for the forward's packed K and V (2·n floats), kept per calling thread and reused: a fresh buffer per
// call costs its page faults (measured here: 2.6 ms of a 15 ms B4 H8 L512 d64 forward, more than the softmax).
// Beyond kScratchKeepFloats the call's own `owner` holds it, so a rare huge call does not pin its memory.
constexpr size_t kScratchKeepFloats = size_t(32) << 20;  // 128 MiB
float* packed_kv_scratch(size_t n, std::vector<vf>& owner) {
  thread_local std::vector<vf> kept;
  const size_t vecs = 2 * n / VW;
  std::vector<vf>& use = 2 * n > kScratchKeepFloats ? owner : kept;
  if (use.size() < vecs) use.resize(vecs);
  return reinterpret_cast<float*>(use.data());
}

template <int DT>
void forward_impl(const Problem& p, const void* q, const void* k, const void* v, void* o, float* lse,
                  const Strides3& so) {
  using St = Storage<DT>;
  const int64_t tiles = (p.LQ + BM - 1) / BM, ktiles = (p.LK + BN - 1) / BN, group = p.H / p.HK;
  const int64_t tile_floats = BN * p.Dp;
  // Every key tile is packed once (Kᵀ as [Dp][BN], V as [BN][Dp], fp32) and then read by all query tiles.
  std::vector<vf> owner;
  float* kt_all = packed_kv_scratch(size_t(p.B * p.HK * ktiles * tile_floats), owner);
  float* v_all = kt_all + p.B * p.HK * ktiles * tile_floats;
#pragma omp parallel
  {
#pragma omp for schedule(static) collapse(2)
    for (int64_t bhk = 0; bhk < p.B * p.HK; ++bhk)
      for (int64_t t = 0; t < ktiles; ++t) {
        const int64_t b = bhk / p.HK, hk = bhk % p.HK, c0 = t * BN;
        const int64_t nc = std::max<int64_t>(0, std::min<int64_t>(BN, p.key_len(b) - c0));
        const auto* kh = static_cast<const typename St::T*>(k) + b * p.sk[0] + hk * p.sk[1];
        const auto* vh = static_cast<const typename St::T*>(v) + b * p.sv[0] + hk * p.sv[1];
        float* kt = kt_all + (bhk * ktiles + t) * tile_floats;
        pack_cols<DT>(kh, p.sk[2], c0, nc, p.D, p.Dp, kt);
        pack_rows<DT>(vh, p.sv[2], c0, nc, p.D, p.Dp, BN, v_all + (bhk * ktiles + t) * tile_floats);
      }
    Buffers buf(p.Dp);
    float m_i[BM];
    vf l_i[BM];  // row sums as lane partials
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t bh = 0; bh < p.B * p.H; ++bh)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t b = bh / p.H, h = bh % p.H, bhk = b * p.HK + h / group;
        const int64_t r0 = t * BM, nr = std::min<int64_t>(BM, p.LQ - r0);
        const int rows = round4(nr);
        const auto* qh = static_cast<const typename St::T*>(q) + b * p.sq[0] + h * p.sq[1];
        pack_rows<DT>(qh, p.sq[2], r0, nr, p.D, p.Dp, rows, buf.q, p.scale * kLog2e);
        std::fill(buf.acc, buf.acc + BM * p.Dp, 0.0f);
        std::fill(m_i, m_i + BM, kNegInf);
        std::fill(l_i, l_i + BM, vf{});
        const int64_t klen = p.key_len(b);
        int64_t lo, hi;
        p.key_range(r0, r0 + nr, b, lo, hi);
        for (int64_t c0 = lo / BN * BN; c0 < hi; c0 += BN) {
          const float* kt = kt_all + (bhk * ktiles + c0 / BN) * tile_floats;
          const float* vb = v_all + (bhk * ktiles + c0 / BN) * tile_floats;
          gemm_abt(buf.q, kt, buf.s, rows, int(p.Dp));
          mask_scores<DT>(p, buf.s, b, h, r0, nr, c0, klen, true);
          // Row maxima first, then every row's rescale factor 2^(m_old − m_new) sixteen rows per exp2v call, then
          // the exponentials: no row waits on the previous one's scalar chain.
          alignas(64) float shift[BM], alpha[BM];
          for (int r = 0; r < BM; ++r) {
            const float mx = r < rows ? max_row(buf.s + r * BN, m_i[r]) : kNegInf;
            shift[r] = mx == kNegInf ? 0.0f : mx;
            alpha[r] = m_i[r];
            m_i[r] = mx;
          }
          for (int r = 0; r < BM; r += VW) {
            vf* a = reinterpret_cast<vf*>(alpha + r);
            *a = exp2v(*a - *reinterpret_cast<const vf*>(shift + r));
          }
          for (int r = 0; r < rows; ++r) {
            float* s = buf.s + r * BN;
            l_i[r] = l_i[r] * alpha[r] + exp2_row(s, shift[r]);
            if (p.threshold > 0) {
              for (int j = 0; j < BN; ++j)
                s[j] = dropout_keep(p.seed, uint32_t(r0 + r), uint32_t(c0 + j), uint32_t(bh), p.threshold)
                           ? s[j] * p.drop_scale : 0.0f;
            }
            if (alpha[r] != 1.0f) {
              vf* a = reinterpret_cast<vf*>(buf.acc + r * p.Dp);
              for (int64_t c = 0; c < p.Dp / VW; ++c) a[c] *= alpha[r];
            }
          }
          gemm_acc(buf.s, BN, 1, vb, buf.acc, rows, BN, int(p.Dp));
        }
        auto* oh = static_cast<typename St::T*>(o) + b * so[0] + h * so[1];
        for (int r = 0; r < nr; ++r) {
          const float l = sum_lanes(l_i[r]);
          const float inv = l > 0 ? 1.0f / l : 0.0f;
          auto* orow = oh + (r0 + r) * so[2];
          for (int64_t d = 0; d < p.D; ++d) orow[d] = St::store(buf.acc[r * p.Dp + d] * inv);
          lse[bh * p.LQ + r0 + r] = l > 0 ? (m_i[r] + std::log2(l)) * kLn2 : kNegInf;
        }
      }
  }
}

// Few query rows (decoding with a KV cache: one new query per step): per (b, h, row) the whole score row at once
// straight from the inputs — s_j = q·k_j·scale·log2e (+ bias·log2e) for the visible keys, its exact max m, then
// p_j = 2^(s_j − m), l = Σ p_j, O = Σ p_j·v_j / l (dropout applied to p after l, as the tiled path). The tiled path
// packs every key tile first and keeps 64-row bookkeeping per tile: at B1 H4 d32 LQ1 it took 68 µs over 1000 keys
// against torch's 22. Same results as the tiled path to rounding; the backward is the tiled one for every LQ.
constexpr int64_t kDecodeRows = 3;  // measured: at 4 rows the tiled path is as fast, beyond it faster

template <int DT>
void decode_impl(const Problem& p, const void* q, const void* k, const void* v, void* o, float* lse,
                 const Strides3& so) {
  using St = Storage<DT>;
  using T = typename St::T;
  const int64_t group = p.H / p.HK, tasks = p.B * p.H * p.LQ;
  const int64_t padded = (p.LK + VW - 1) / VW * VW + VW;  // room to align a window's first key down to a vector
  const bool parallel = tasks > 1 && tasks * p.LK * p.D >= (int64_t(1) << 16);  // else the fork costs more
  const float scale_log2 = p.scale * kLog2e;
  const auto* bias = static_cast<const T*>(p.bias);
#pragma omp parallel if (parallel)
  {
    std::vector<vf> store(size_t(padded / VW + 2 * p.Dp / VW));
    float* s = reinterpret_cast<float*>(store.data());
    float* qs = s + padded;  // the query row, times scale·log2e
    float* acc = qs + p.Dp;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / p.LQ, i = task % p.LQ, b = bh / p.H, h = bh % p.H, hk = h / group;
      const T* qi = static_cast<const T*>(q) + b * p.sq[0] + h * p.sq[1] + i * p.sq[2];
      const T* kh = static_cast<const T*>(k) + b * p.sk[0] + hk * p.sk[1];
      const T* vh = static_cast<const T*>(v) + b * p.sv[0] + hk * p.sv[1];
      for (int64_t d = 0; d < p.D; ++d) qs[d] = St::load(qi[d]) * scale_log2;
      int64_t lo, hi;
      p.key_range(i, i + 1, b, lo, hi);
      hi = std::max(hi, lo);
      const int64_t lo_v = lo / VW * VW, hi_v = (hi + VW - 1) / VW * VW;  // whole vectors, -inf outside [lo, hi)
      std::fill(s + lo_v, s + lo, kNegInf);
      std::fill(s + hi, s + hi_v, kNegInf);
      float m = kNegInf;
      for (int64_t j = lo; j < hi; ++j) {
        const T* kj = kh + j * p.sk[2];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < p.D; ++d) dot += qs[d] * St::load(kj[d]);
        if (bias) dot += St::load(bias[b * p.sb[0] + h * p.sb[1] + i * p.sb[2] + j * p.sb[3]]) * kLog2e;
        s[j] = dot;
        m = std::max(m, dot);
      }
      std::fill(acc, acc + p.D, 0.0f);
      vf l_v = {};
      if (m != kNegInf) {  // else every visible score is -inf (a bias of -inf): the row sees nothing
        for (int64_t j = lo_v; j < hi_v; j += VW) {
          vf* sv = reinterpret_cast<vf*>(s + j);
          *sv = exp2v(*sv - m);
          l_v += *sv;
        }
        for (int64_t j = lo; j < hi; ++j) {
          float pj = s[j];
          if (p.threshold > 0)
            pj = dropout_keep(p.seed, uint32_t(i), uint32_t(j), uint32_t(bh), p.threshold) ? pj * p.drop_scale : 0.0f;
          if (pj == 0.0f) continue;
          const T* vj = vh + j * p.sv[2];
#pragma omp simd
          for (int64_t d = 0; d < p.D; ++d) acc[d] += pj * St::load(vj[d]);
        }
      }
      const float l = sum_lanes(l_v), inv = l > 0 ? 1.0f / l : 0.0f;
      auto* orow = static_cast<T*>(o) + b * so[0] + h * so[1] + i * so[2];
      for (int64_t d = 0; d < p.D; ++d) orow[d] = St::store(acc[d] * inv);
      lse[bh * p.LQ + i] = l > 0 ? (m + std::log2(l)) * kLn2 : kNegInf;
    }
  }
}

template <int DT>
void backward_impl(const Problem& p, const void* dout, const Strides3& sdo, const void* q, const void* k,
                   const void* v, const float* lse, const float* delta, void* dq, void* dk, void* dv, float* dbias) {
  using St = Storage<DT>;
  const int64_t group = p.H / p.HK, Dp = p.Dp;
  const int64_t qtiles = (p.LQ + BM - 1) / BM;
#pragma omp parallel
  {
    Buffers buf(Dp);
    std::vector<vf> kb_store(size_t(BN * Dp / VW)), vt_store(size_t(BN * Dp / VW)), dk_store(size_t(BN * Dp / VW)),
        dv_store(size_t(BN * Dp / VW));
    float* kb = reinterpret_cast<float*>(kb_store.data());
    float* vt = reinterpret_cast<float*>(vt_store.data());
    float* dk_acc = reinterpret_cast<float*>(dk_store.data());
    float* dv_acc = reinterpret_cast<float*>(dv_store.data());
    std::vector<vf> dq_store;
    float row_lse[BM], row_delta[BM];
#pragma omp for schedule(dynamic, 1)
    for (int64_t bhk = 0; bhk < p.B * p.HK; ++bhk) {
      const int64_t b = bhk / p.HK, hk = bhk % p.HK;
      dq_store.assign(size_t(group * qtiles * BM * Dp / VW), vf{});
      float* dq_acc = reinterpret_cast<float*>(dq_store.data());  // [group][qtiles·BM][Dp]
      const int64_t klen = p.key_len(b);
      const auto* kh = static_cast<const typename St::T*>(k) + b * p.sk[0] + hk * p.sk[1];
      const auto* vh = static_cast<const typename St::T*>(v) + b * p.sv[0] + hk * p.sv[1];
      for (int64_t c0 = 0; c0 < p.LK; c0 += BN) {
        const int64_t nc = std::max<int64_t>(0, std::min<int64_t>(BN, klen - c0));
        std::fill(dk_acc, dk_acc + BN * Dp, 0.0f);
        std::fill(dv_acc, dv_acc + BN * Dp, 0.0f);
        if (nc > 0) {
          pack_cols<DT>(kh, p.sk[2], c0, nc, p.D, Dp, buf.kt);
          pack_cols<DT>(vh, p.sv[2], c0, nc, p.D, Dp, vt);
          pack_rows<DT>(kh, p.sk[2], c0, nc, p.D, Dp, BN, kb);
          // query rows that can see keys [c0, c0 + nc)
          int64_t r_lo = 0, r_hi = p.LQ;
          if (p.win_r >= 0) r_lo = std::max<int64_t>(0, c0 - p.win_r);
          if (p.win_l >= 0) r_hi = std::min<int64_t>(p.LQ, c0 + nc + p.win_l);
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = hk * group + g, bh = b * p.H + h;
            const auto* qh = static_cast<const typename St::T*>(q) + b * p.sq[0] + h * p.sq[1];
            const auto* doh = static_cast<const typename St::T*>(dout) + b * sdo[0] + h * sdo[1];
            for (int64_t r0 = r_lo / BM * BM; r0 < r_hi; r0 += BM) {
              const int64_t nr = std::min<int64_t>(BM, p.LQ - r0);
              const int rows = round4(nr);
              float* P = buf.s;
              float* dS = buf.s + BM * BN;
              pack_rows<DT>(qh, p.sq[2], r0, nr, p.D, Dp, rows, buf.q);
              pack_rows<DT>(doh, sdo[2], r0, nr, p.D, Dp, rows, buf.rows);
              for (int r = 0; r < BM; ++r) {
                const float l = r < nr ? lse[bh * p.LQ + r0 + r] : kNegInf;
                row_lse[r] = l == kNegInf ? std::numeric_limits<float>::infinity() : l * kLog2e;
                row_delta[r] = r < nr ? delta[bh * p.LQ + r0 + r] : 0.0f;
              }
              gemm_abt(buf.q, buf.kt, P, rows, int(Dp));
              mask_scores<DT>(p, P, b, h, r0, nr, c0, klen);
              gemm_abt(buf.rows, vt, dS, rows, int(Dp));  // dPd = dO·Vᵀ
              for (int r = 0; r < rows; ++r) {
                float* pr = P + r * BN;
                float* dr = dS + r * BN;
                const float ml = row_lse[r], dl = row_delta[r];
                exp2_row(pr, ml);
                if (p.threshold > 0) {
                  // Pd = P∘keep/(1-p) goes to dV; dP = dPd∘keep/(1-p); P itself stays for dS
                  float* pd = buf.pd + r * BN;
                  for (int j = 0; j < BN; ++j) {
                    const bool keep = dropout_keep(p.seed, uint32_t(r0 + r), uint32_t(c0 + j), uint32_t(bh),
                                                   p.threshold);
                    pd[j] = keep ? pr[j] * p.drop_scale : 0.0f;
                    dr[j] = keep ? dr[j] * p.drop_scale : 0.0f;
                  }
                }
#pragma omp simd
                for (int j = 0; j < BN; ++j) dr[j] = pr[j] * (dr[j] - dl);  // dS = P∘(dP − Δ)
              }
              const float* Pd = p.threshold > 0 ? buf.pd : P;
              gemm_acc(Pd, 1, BN, buf.rows, dv_acc, round4(nc), rows, int(Dp));  // dV += Pdᵀ·dO
              gemm_acc(dS, 1, BN, buf.q, dk_acc, round4(nc), rows, int(Dp));       // dK += dSᵀ·Q
              gemm_acc(dS, BN, 1, kb, dq_acc + (g * qtiles * BM + r0) * Dp, rows, BN, int(Dp));  // dQ += dS·K
              if (dbias) {
                for (int64_t r = 0; r < nr; ++r)
                  std::copy(dS + r * BN, dS + r * BN + nc, dbias + (bh * p.LQ + r0 + r) * p.LK + c0);
              }
            }
          }
        }
        auto* dkh = static_cast<typename St::T*>(dk) + (bhk * p.LK) * p.D;
        auto* dvh = static_cast<typename St::T*>(dv) + (bhk * p.LK) * p.D;
        for (int64_t c = 0; c < std::min<int64_t>(BN, p.LK - c0); ++c)
          for (int64_t d = 0; d < p.D; ++d) {
            dkh[(c0 + c) * p.D + d] = St::store(dk_acc[c * Dp + d] * p.scale);
            dvh[(c0 + c) * p.D + d] = St::store(dv_acc[c * Dp + d]);
          }
      }
      for (int64_t g = 0; g < group; ++g) {
        auto* dqh = static_cast<typename St::T*>(dq) + ((b * p.H + hk * group + g) * p.LQ) * p.D;
        const float* src = dq_acc + g * qtiles * BM * Dp;
        for (int64_t r = 0; r < p.LQ; ++r)
          for (int64_t d = 0; d < p.D; ++d) dqh[r * p.D + d] = St::store(src[r * Dp + d] * p.scale);
      }
    }
  }
}

Problem make_problem(int64_t B, int64_t H, int64_t HK, int64_t LQ, int64_t LK, int64_t D, Strides3 sq, Strides3 sk,
                     Strides3 sv, Strides4 sb, int64_t bias, int64_t klen, double scale, int64_t win_l, int64_t win_r,
                     uint64_t seed, uint64_t threshold, double drop_scale) {
  return Problem{B,  H,  HK, LQ, LK, D, (D + VW - 1) / VW * VW, sq, sk, sv, sb, reinterpret_cast<const void*>(bias),
                 reinterpret_cast<const int32_t*>(klen), float(scale), win_l, win_r, seed, threshold,
                 float(drop_scale)};
}

template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(std::integral_constant<int, kF32>{}); break;
    case kBF16: f(std::integral_constant<int, kBF16>{}); break;
    case kF16: f(std::integral_constant<int, kF16>{}); break;
    default: throw std::invalid_argument("attention: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace

void register_attention(py::module_& m) {
  m.def(
      "attention_forward",
      [](int64_t q, int64_t k, int64_t v, int64_t o, int64_t lse, int64_t bias, int64_t klen, int dtype, int64_t B,
         int64_t H, int64_t HK, int64_t LQ, int64_t LK, int64_t D, Strides3 sq, Strides3 sk, Strides3 sv,
         Strides3 so, Strides4 sb, double scale, int64_t win_l, int64_t win_r, uint64_t seed, uint64_t threshold,
         double drop_scale) {
        const Problem p = make_problem(B, H, HK, LQ, LK, D, sq, sk, sv, sb, bias, klen, scale, win_l, win_r, seed,
                                       threshold, drop_scale);
        py::gil_scoped_release release;
        with_dtype(dtype, [&](auto dt) {
          auto* impl = LQ <= kDecodeRows ? decode_impl<decltype(dt)::value> : forward_impl<decltype(dt)::value>;
          impl(p, reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k), reinterpret_cast<const void*>(v),
               reinterpret_cast<void*>(o), reinterpret_cast<float*>(lse), so);
        });
      },
      "Flash attention forward (see csrc/cpu/attention.cpp); o [B,H,LQ,D] with strides so, lse fp32 [B,H,LQ]");
  m.def(
      "attention_backward",
      [](int64_t dout, Strides3 sdo, int64_t q, int64_t k, int64_t v, int64_t lse, int64_t delta, int64_t dq,
         int64_t dk, int64_t dv, int64_t dbias, int64_t bias, int64_t klen, int dtype, int64_t B, int64_t H,
         int64_t HK, int64_t LQ, int64_t LK, int64_t D, Strides3 sq, Strides3 sk, Strides3 sv, Strides4 sb,
         double scale, int64_t win_l, int64_t win_r, uint64_t seed, uint64_t threshold, double drop_scale) {
        const Problem p = make_problem(B, H, HK, LQ, LK, D, sq, sk, sv, sb, bias, klen, scale, win_l, win_r, seed,
                                       threshold, drop_scale);
        py::gil_scoped_release release;
        with_dtype(dtype, [&](auto dt) {
          backward_impl<decltype(dt)::value>(
              p, reinterpret_cast<const void*>(dout), sdo, reinterpret_cast<const void*>(q),
              reinterpret_cast<const void*>(k), reinterpret_cast<const void*>(v), reinterpret_cast<const float*>(lse),
              reinterpret_cast<const float*>(delta), reinterpret_cast<void*>(dq), reinterpret_cast<void*>(dk),
              reinterpret_cast<void*>(dv), reinterpret_cast<float*>(dbias));
        });
      },
      "Flash attention backward; dq [B,H,LQ,D], dk/dv [B,HK,LK,D] contiguous in the input dtype, dbias fp32 "
      "[B,H,LQ,LK] or 0");
}
