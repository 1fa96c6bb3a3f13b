// Philox4x32-10 counter-based random words, shared by the CPU twins and the CUDA kernels.
// Dropout masks (attention, bias+GELU): element (i, j) of stream `bh` is kept iff the first output word for
// counter (j, i, bh, 0) and key (seed_lo, seed_hi) is ≥ threshold = round(p·2³²). The Triton kernels
// (kernels/attention.py _dropout_keep) and the reference (dlcore/ops/attention.py philox_keep) compute the same
// words, so every backend drops the same elements. Replay sampling offsets: uniform53 below.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace dlcore {

// Philox4x32-10 (Salmon et al. 2011): the four output words for counter (c0, c1, c2, c3) and key (k0, k1).
struct PhiloxWords {
  uint32_t w[4];
};

DL_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = uint64_t(0xCD9E8D57u) * c2, pa = uint64_t(0xD2511F53u) * c0;
    c0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    c2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

DL_HD bool dropout_keep(uint64_t seed, uint32_t i, uint32_t j, uint32_t bh, uint64_t threshold) {
  return uint64_t(philox4x32_10(j, i, bh, 0, seed).w[0]) >= threshold;
}

// The replay buffers' sampling offsets (dlcore/rl/sum_tree.py draw_offsets): element i of draw `counter` is a
// float64 in [0, 1) from the top 53 of the 64 bits (w0, w1) of counter (i, counter_lo, counter_hi, 1); c3 = 1 keeps
// this stream apart from the dropout masks' (c3 = 0) even under one seed.
DL_HD double uniform53(uint64_t seed, uint64_t counter, uint32_t i) {
  const PhiloxWords r = philox4x32_10(i, uint32_t(counter), uint32_t(counter >> 32), 1, seed);
  return double(((uint64_t(r.w[0]) << 32) | r.w[1]) >> 11) * 0x1p-53;
}

// A stratified sample's offsets: `given` (offset b at given[b]), or, when given is null, element b of Philox draw
// `counter` under `seed` — the CPU and CUDA sum-tree kernels' one reader of both.
struct DrawOffsets {
  const double* given;
  uint64_t seed, counter;
  DL_HD double at(int64_t b) const { return given ? given[b] : uniform53(seed, counter, uint32_t(b)); }
};

#if !defined(__CUDACC__)
// The same words for 16 consecutive columns j0..j0+15 of row i at once (GCC vectors; the 32×32→64-bit products
// become vpmuludq on AVX-512/AVX2). Returns a lane mask: all ones where the element is kept.
typedef uint32_t philox_vu __attribute__((vector_size(64)));
typedef uint64_t philox_vu64 __attribute__((vector_size(128)));
typedef int32_t philox_vi __attribute__((vector_size(64)));

inline philox_vi dropout_keep16(uint64_t seed, uint32_t i, uint32_t j0, uint32_t bh, uint64_t threshold) {
  philox_vu c0 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  c0 += j0;
  philox_vu c1 = philox_vu{} + i, c2 = philox_vu{} + bh, c3 = {};
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const philox_vu64 pb = __builtin_convertvector(c2, philox_vu64) * uint64_t(0xCD9E8D57u);
    const philox_vu64 pa = __builtin_convertvector(c0, philox_vu64) * uint64_t(0xD2511F53u);
    c0 = __builtin_convertvector(pb >> 32, philox_vu) ^ c1 ^ k0;
    c2 = __builtin_convertvector(pa >> 32, philox_vu) ^ c3 ^ k1;
    c1 = __builtin_convertvector(pb, philox_vu);
    c3 = __builtin_convertvector(pa, philox_vu);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const philox_vu64 word = __builtin_convertvector(c0, philox_vu64);
  return __builtin_convertvector(word >= threshold, philox_vi);
}
#endif

}  // namespace dlcore
