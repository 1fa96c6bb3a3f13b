// Sum-tree kernels for prioritized replay (the `cpu` backend of dlcore/rl/sum_tree.py's ops; the numba kernels
// there are the `numba` backend and compute the same trees and draws bit for bit). The layout is that module's:
// the binary sum-tree stored 8-ary, node j of level l at levels[l] + j, its 8 children at levels[l + 1] + 8j (one
// 64-byte line), a node the pairwise sum ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)); root at [0]; min_tree alike.
//
// Why a C++ twin: a 1M-leaf tree (2 × 9.6 MB) is out of the caches between two learner steps, so the numba
// descent waits on misses the out-of-order window overlaps only a few at a time. Here every level's pass
// prefetches the child lines of the samples kPrefetchAhead places ahead (their nodes are known from the previous
// pass), and the update prefetches all leaves before writing them; the sample and the batch's gather are one call.
// From a batch of kSplitBatch both run on two threads (2x the lines in flight): the sample splits the draws, the
// update the leaves at a node edge (its 256 of 1M on the 2-core Intel Xeon VM, blocks of 200 calls alternating
// 1 and 2 threads: 14.2 -> 11.4-13.6 us with the tree cached between calls, 38-39 -> 28-30 us after a
// torch.multinomial over 1M evicted it).
#include <immintrin.h>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/philox.h"

namespace py = pybind11;

namespace dlcore {
int gather_rows(const std::vector<int64_t>& srcs, const std::vector<int64_t>& dsts,
                const std::vector<int64_t>& row_bytes, int64_t index_addr, int64_t n, int64_t limit);
}

namespace {

// Draws ahead whose child lines a level's pass prefetches: at ~130 ns a line from beyond L2 (the Intel Xeon VM's
// 8-32 MB latency) 16 draws were too few; 48 ran 4-10% faster in 12 of 12 interleaved comparisons of the two
// builds there (256 of 1M: descent 14.6 -> 13.6 us, with the gather 22.8 -> 21.0, after an evicting call 53 -> 51).
constexpr int64_t kPrefetchAhead = 48;
constexpr int64_t kSplitBatch = 128;  // from this batch on, two threads take half the draws (and rows) each
constexpr int kBadPriority = 1, kBadIndex = 2;  // sum_tree.py's status codes

// One binary step: right when the mass lies at or past the left sum and the right subtree is not empty (rounding
// can leave a mass just past the left sum; an unwritten, zero leaf is never returned). Arithmetic, not a branch
// (GCC turns a ?: here into one): the direction is a coin flip the CPU cannot predict (256 draws from a cached
// 4k-leaf tree: 14.2 -> 13.3 us). Sums are finite and non-negative, so left·0 = 0 and left·1 = left exactly: the
// same mass as a select.
inline int pick(double& mass, double left, double right) {
  const int go_right = int(mass >= left) & int(right > 0.0);
  mass -= left * double(go_right);
  return go_right;
}

// One 8-ary level of draws [b0, b1) one at a time (the scalar path; also the tail of the vector one).
inline void level_scalar(const double* base, int64_t* node, double* mass, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    if (b + kPrefetchAhead < b1) __builtin_prefetch(base + 8 * node[b + kPrefetchAhead], 0, 0);
    const double* c = base + 8 * node[b];
    const double pair[4] = {c[0] + c[1], c[2] + c[3], c[4] + c[5], c[6] + c[7]};
    double m = mass[b];
    const int r1 = pick(m, pair[0] + pair[1], pair[2] + pair[3]);
    const int r2 = pick(m, pair[2 * r1], pair[2 * r1 + 1]);
    const int k = 4 * r1 + 2 * r2;
    const int r3 = pick(m, c[k], c[k + 1]);
    node[b] = 8 * node[b] + k + r3;
    mass[b] = m;
  }
}

#if defined(__AVX512F__)
// The same level for 8 draws per vector: their 8 children by 8 gathers (8 lines in flight per instruction), the
// three binary decisions as masks and blends. Same IEEE operations as the scalar path: the same draws bit for bit.
inline int64_t level_avx512(const double* base, int64_t* node, double* mass, int64_t batch) {
  const __m512d zero = _mm512_setzero_pd();
  int64_t b = 0;
  for (; b + 8 <= batch; b += 8) {
    if (b + 8 + kPrefetchAhead <= batch)
      for (int i = 0; i < 8; ++i) __builtin_prefetch(base + 8 * node[b + kPrefetchAhead + i], 0, 0);
    const __m512i vnode = _mm512_loadu_si512(node + b);
    const __m512i off = _mm512_slli_epi64(vnode, 3);
    __m512d c[8];
    for (int j = 0; j < 8; ++j) c[j] = _mm512_i64gather_pd(_mm512_add_epi64(off, _mm512_set1_epi64(j)), base, 8);
    const __m512d s01 = _mm512_add_pd(c[0], c[1]), s23 = _mm512_add_pd(c[2], c[3]);
    const __m512d s45 = _mm512_add_pd(c[4], c[5]), s67 = _mm512_add_pd(c[6], c[7]);
    const __m512d q0 = _mm512_add_pd(s01, s23), q1 = _mm512_add_pd(s45, s67);
    __m512d m = _mm512_loadu_pd(mass + b);
    const __mmask8 r1 = _mm512_cmp_pd_mask(m, q0, _CMP_GE_OQ) & _mm512_cmp_pd_mask(q1, zero, _CMP_GT_OQ);
    m = _mm512_mask_sub_pd(m, r1, m, q0);
    const __m512d left2 = _mm512_mask_blend_pd(r1, s01, s45), right2 = _mm512_mask_blend_pd(r1, s23, s67);
    const __mmask8 r2 = _mm512_cmp_pd_mask(m, left2, _CMP_GE_OQ) & _mm512_cmp_pd_mask(right2, zero, _CMP_GT_OQ);
    m = _mm512_mask_sub_pd(m, r2, m, left2);
    const __m512d left3 =
        _mm512_mask_blend_pd(r1, _mm512_mask_blend_pd(r2, c[0], c[2]), _mm512_mask_blend_pd(r2, c[4], c[6]));
    const __m512d right3 =
        _mm512_mask_blend_pd(r1, _mm512_mask_blend_pd(r2, c[1], c[3]), _mm512_mask_blend_pd(r2, c[5], c[7]));
    const __mmask8 r3 = _mm512_cmp_pd_mask(m, left3, _CMP_GE_OQ) & _mm512_cmp_pd_mask(right3, zero, _CMP_GT_OQ);
    m = _mm512_mask_sub_pd(m, r3, m, left3);
    __m512i child = _mm512_maskz_mov_epi64(r1, _mm512_set1_epi64(4));
    child = _mm512_add_epi64(child, _mm512_maskz_mov_epi64(r2, _mm512_set1_epi64(2)));
    child = _mm512_add_epi64(child, _mm512_maskz_mov_epi64(r3, _mm512_set1_epi64(1)));
    _mm512_storeu_si512(node + b, _mm512_add_epi64(off, child));
    _mm512_storeu_pd(mass + b, m);
  }
  return b;
}
#endif

// Draws [b0, b1) of a batch of `batch` (offsets indexed by draw): node/weight point at draw b0.
void descend(const double* tree, const double* min_tree, const int64_t* levels, int depth,
             const dlcore::DrawOffsets& offsets,
             int64_t b0, int64_t b1, int64_t batch_total, double beta, int64_t* node, void* weight, bool weight_f32) {
  const double total = tree[0];
  const int64_t batch = b1 - b0;
  std::vector<double> mass(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    // stratum b of B: mass (b + u_b)·total/B, kept below the total
    const double u = offsets.at(b0 + b);
    mass[b] = std::min((double(b0 + b) + u) * (total / double(batch_total)), total * (1.0 - 0x1p-52));
    node[b] = 0;
  }
  for (int level = 1; level <= depth; ++level) {  // one 8-ary level (three binary levels) of every descent per pass
    const double* base = tree + levels[level];
    int64_t done = 0;
#if defined(__AVX512F__)
    done = level_avx512(base, node, mass.data(), batch);
#endif
    level_scalar(base, node, mass.data(), done, batch);
  }
  const double* leaves = tree + levels[depth];
  const double inv_min = 1.0 / min_tree[0];
  for (int64_t b = 0; b < batch; ++b) {
    const double w = std::pow(leaves[node[b]] * inv_min, -beta);  // (p / p_min)^-β, in float64 either way
    if (weight_f32)
      static_cast<float*>(weight)[b] = float(w);
    else
      static_cast<double*>(weight)[b] = w;
  }
}

// Returns 0, or 1 when a gathered row index is out of [0, limit) (cannot happen for a consistent tree). offsets 0:
// draw them from Philox (seed, counter), as draw_offsets does (one Python-level torch call less per sample).
int sample_gather(int64_t tree, int64_t min_tree, int64_t levels, int depth, int64_t offsets, int64_t batch,
                  double beta, int64_t out_index, int64_t out_weight, bool weight_f32, const std::vector<int64_t>& srcs,
                  const std::vector<int64_t>& dsts, const std::vector<int64_t>& row_bytes, int64_t limit,
                  uint64_t seed, uint64_t counter) {
  int status = 0;
  const dlcore::DrawOffsets draw{reinterpret_cast<const double*>(offsets), seed, counter};
  const bool split = batch >= kSplitBatch && omp_get_max_threads() > 1;  // torch.set_num_threads(1) holds
#pragma omp parallel num_threads(2) if (split) reduction(| : status)
  {
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
    const int64_t b0 = batch * part / parts, b1 = batch * (part + 1) / parts;
    descend(reinterpret_cast<const double*>(tree), reinterpret_cast<const double*>(min_tree),
            reinterpret_cast<const int64_t*>(levels), depth, draw, b0, b1,
            batch, beta, reinterpret_cast<int64_t*>(out_index) + b0,
            reinterpret_cast<char*>(out_weight) + b0 * (weight_f32 ? sizeof(float) : sizeof(double)), weight_f32);
    if (!srcs.empty() && b1 > b0) {
      std::vector<int64_t> dst_part(dsts);
      for (size_t f = 0; f < dsts.size(); ++f) dst_part[f] += b0 * row_bytes[f];
      status |= dlcore::gather_rows(srcs, dst_part, row_bytes, out_index + b0 * 8, b1 - b0, limit);
    }
  }
  return status;
}

inline void recompute(double* tree, double* min_tree, int64_t node, int64_t c) {
  const double* t = tree + c;
  const double* m = min_tree + c;
  tree[node] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));  // the binary tree's order
  min_tree[node] = std::min(std::min(std::min(m[0], m[1]), std::min(m[2], m[3])),
                            std::min(std::min(m[4], m[5]), std::min(m[6], m[7])));
}

#if defined(__AVX512F__)
struct AddPd {
  __m512d operator()(__m512d a, __m512d b) const { return _mm512_add_pd(a, b); }
};
struct MinPd {  // sums are never NaN, so this is std::min
  __m512d operator()(__m512d a, __m512d b) const { return _mm512_min_pd(a, b); }
};

// recompute() of 8 nodes at once: lane k = ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)) of line[k], the same roundings.
// Unpacking two lines puts their pair sums side by side, 128-bit lane shuffles then pair those up twice. The
// update is instruction-bound once its lines are fetched (a 256-update batch over a cached tree: ~6 us, of which
// ~2 the pow); this takes 22 vector instructions per 8 nodes and tree where the scalar form takes ~60.
template <typename Op>
inline __m512d reduce_lines(const double* const line[8], Op op) {
  __m512d pair[4];  // pair[j]'s 128-bit lane i: (line[2j] pair i, line[2j+1] pair i)
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_loadu_pd(line[2 * j]), b = _mm512_loadu_pd(line[2 * j + 1]);
    pair[j] = op(_mm512_unpacklo_pd(a, b), _mm512_unpackhi_pd(a, b));
  }
  __m512d quad[2];  // quad[j]: the half sums (c0..c3, c4..c7) of lines 4j..4j+3, two lines per 128-bit lane
  for (int j = 0; j < 2; ++j)  // 0x88: 128-bit lanes 0, 2 of a then b; 0xDD: lanes 1, 3
    quad[j] = op(_mm512_shuffle_f64x2(pair[2 * j], pair[2 * j + 1], 0x88),
                 _mm512_shuffle_f64x2(pair[2 * j], pair[2 * j + 1], 0xDD));
  return op(_mm512_shuffle_f64x2(quad[0], quad[1], 0x88), _mm512_shuffle_f64x2(quad[0], quad[1], 0xDD));
}
#endif

// recompute() of the nodes base + node[k], k < count, from their child lines at children + 8·node[k].
void recompute_nodes(double* tree, double* min_tree, int64_t base, int64_t children, const int64_t* node,
                     int64_t count) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 8 <= count; k += 8) {
    const double* sum_lines[8];
    const double* min_lines[8];
    for (int i = 0; i < 8; ++i) {
      sum_lines[i] = tree + children + 8 * node[k + i];
      min_lines[i] = min_tree + children + 8 * node[k + i];
    }
    alignas(64) double sums[8], mins[8];
    _mm512_store_pd(sums, reduce_lines(sum_lines, AddPd{}));
    _mm512_store_pd(mins, reduce_lines(min_lines, MinPd{}));
    for (int i = 0; i < 8; ++i) {  // a node named twice gets the same value twice
      tree[base + node[k + i]] = sums[i];
      min_tree[base + node[k + i]] = mins[i];
    }
  }
#endif
  for (; k < count; ++k) recompute(tree, min_tree, base + node[k], children + 8 * node[k]);
}

// Leaves index[k] ← (priority[k] + eps)^alpha for the k (in order) whose leaf lies in [lo, hi), then their
// ancestors at levels [first_scatter, depth): those levels' touched nodes only, one level per pass, the parents'
// lines fetched while a level is summed. Every node at those levels lies wholly inside [lo, hi) or outside it
// (lo and hi are multiples of the leaves under one first_scatter node), so two calls on disjoint ranges write
// disjoint nodes and may run at once; a duplicate index stays in one range, where the last write wins.
template <typename P>
void update_range(double* tree, double* min_tree, const int64_t* levels, int depth, int first_scatter,
                  const int64_t* index, const P* priority, int64_t n, double eps, double alpha, int64_t lo,
                  int64_t hi) {
  const int64_t leaf0 = levels[depth];
  for (int64_t k = 0; k < n; ++k) {  // start fetching this range's leaves (on the core that writes them)
    if (index[k] < lo || index[k] >= hi) continue;
    __builtin_prefetch(tree + leaf0 + index[k], 1, 0);
    __builtin_prefetch(min_tree + leaf0 + index[k], 1, 0);
  }
  std::vector<int64_t> node;
  node.reserve(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    if (index[k] < lo || index[k] >= hi) continue;
    const double v = std::pow(double(priority[k]) + eps, alpha);
    tree[leaf0 + index[k]] = v;
    min_tree[leaf0 + index[k]] = v > 0.0 ? v : INFINITY;  // a 0 leaf is never drawn
    node.push_back(index[k] / 8);
  }
  const int64_t count = static_cast<int64_t>(node.size());
  for (int level = depth - 1; level >= first_scatter; --level) {
    const int64_t base = levels[level], children = levels[level + 1];
    for (int64_t k = 0; k < count; ++k) {
      __builtin_prefetch(tree + base + node[k], 1, 0);
      __builtin_prefetch(min_tree + base + node[k], 1, 0);
    }
    recompute_nodes(tree, min_tree, base, children, node.data(), count);
    for (int64_t k = 0; k < count; ++k) node[k] /= 8;
  }
}

// Leaves index[k] ← (priority[k] + eps)^alpha in order (the last write of a duplicate wins), then every touched
// ancestor from its children, level by level. Returns (status, max(priority + eps)); nothing is written unless the
// status is 0 (1: a priority is negative or not finite; 2: an index is outside [0, limit)). Priorities are float64
// or float32 (TD errors usually are: read as they are, widened exactly, instead of a conversion call from Python).
// Levels with more nodes than the batch has updates ("scatter" levels) recompute the touched nodes; from batch
// kSplitBatch on, two threads take the leaves below and above a split point (each its own subtrees: their cache
// misses overlap, 2x the lines in flight). Levels with no more nodes than updates are then recomputed whole, in
// memory order (same sums, no scatter). Either way every node gets the same value as one sequential pass.
template <typename P>
std::tuple<int, double> update_leaves(double* tree, double* min_tree, const int64_t* levels, int depth,
                                      const int64_t* index, const P* priority, int64_t n, double eps, double alpha,
                                      int64_t limit) {
  double top = 0.0;
  for (int64_t k = 0; k < n; ++k) {  // validate everything before writing anything
    const double p = double(priority[k]);
    if (!(p >= 0.0 && p < INFINITY)) return {kBadPriority, 0.0};
    if (index[k] < 0 || index[k] >= limit) return {kBadIndex, 0.0};
    top = std::max(top, p + eps);
  }
  auto width = [&](int level) { return (levels[level + 2] - levels[level + 1]) / 8; };  // nodes of a level
  int first_scatter = depth;  // widths grow with depth: the scatter levels are [first_scatter, depth)
  while (first_scatter > 0 && width(first_scatter - 1) > n) --first_scatter;
  int64_t grain = 1;  // leaves under one node of level first_scatter
  for (int level = first_scatter; level < depth; ++level) grain *= 8;
  const int64_t split = (limit / 2 + grain / 2) / grain * grain;  // the middle of the written leaves, on a node edge
  // (a tree with no scatter level is small enough to stay cached: nothing to overlap)
  const bool two = n >= kSplitBatch && omp_get_max_threads() > 1 && first_scatter < depth && split > 0 &&
                   split < limit;
#pragma omp parallel num_threads(2) if (two)
  {
    const int part = omp_get_thread_num(), parts = omp_get_num_threads();
    const int64_t lo = parts == 1 ? 0 : (part == 0 ? 0 : split), hi = parts == 1 || part == 1 ? limit : split;
    update_range(tree, min_tree, levels, depth, first_scatter, index, priority, n, eps, alpha, lo, hi);
  }
  std::vector<int64_t> all;
  for (int level = first_scatter - 1; level >= 0; --level) {
    const int64_t w = width(level);
    all.resize(static_cast<size_t>(w));
    for (int64_t j = 0; j < w; ++j) all[j] = j;
    recompute_nodes(tree, min_tree, levels[level], levels[level + 1], all.data(), w);
  }
  return {0, top};
}

std::tuple<int, double> update(int64_t tree, int64_t min_tree, int64_t levels, int depth, int64_t index,
                               int64_t priority, bool priority_is_f32, int64_t n, double eps, double alpha,
                               int64_t limit) {
  auto run = [&](const auto* p) {
    return update_leaves(reinterpret_cast<double*>(tree), reinterpret_cast<double*>(min_tree),
                         reinterpret_cast<const int64_t*>(levels), depth, reinterpret_cast<const int64_t*>(index), p,
                         n, eps, alpha, limit);
  };
  return priority_is_f32 ? run(reinterpret_cast<const float*>(priority))
                         : run(reinterpret_cast<const double*>(priority));
}

void draw_offsets(uint64_t seed, uint64_t counter, int64_t n, int64_t out) {
  double* o = reinterpret_cast<double*>(out);
  const dlcore::DrawOffsets draw{nullptr, seed, counter};
  for (int64_t i = 0; i < n; ++i) o[i] = draw.at(i);
}

}  // namespace

void register_sum_tree(py::module_& m) {
  m.def("sum_tree_sample_gather", &sample_gather,
        "Stratified descents of the 8-ary sum-tree (offsets 0: drawn from Philox (seed, counter)): leaf index, "
        "weight (p/p_min)^-beta as float64, or float32 when weight_f32; then rows index of every source (addresses "
        "and row sizes in bytes; none: no gather); 1 if a row index is out of [0, limit)",
        py::arg("tree"), py::arg("min_tree"), py::arg("levels"), py::arg("depth"), py::arg("offsets"),
        py::arg("batch"), py::arg("beta"), py::arg("out_index"), py::arg("out_weight"), py::arg("weight_f32"),
        py::arg("srcs"), py::arg("dsts"), py::arg("row_bytes"), py::arg("limit"), py::arg("seed") = 0,
        py::arg("counter") = 0);
  m.def("sum_tree_draw_offsets", &draw_offsets,
        "n float64 offsets in [0, 1) of draw `counter` under `seed` (Philox4x32-10, uniform53 in common/philox.h)",
        py::arg("seed"), py::arg("counter"), py::arg("n"), py::arg("out"));
  m.def("sum_tree_update", &update,
        "Leaves <- (priority + eps)^alpha, then their ancestors; (status, max(priority + eps))", py::arg("tree"),
        py::arg("min_tree"), py::arg("levels"), py::arg("depth"), py::arg("index"), py::arg("priority"),
        py::arg("priority_is_f32"), py::arg("n"), py::arg("eps"), py::arg("alpha"), py::arg("limit"));
}
