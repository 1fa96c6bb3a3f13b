// The input gradient of a convolution with few input channels (fp32, channels_last), for the CPU backward of
// dlcore's conv ops: dx = conv_transpose(dz, W), i.e.
//     dx[n, ih, iw, c] = Σ_{kh, kw, co} dz[n, oh, ow, co] · W[co, c, kh, kw]   where ih = oh·S_h − P_h + kh,
//                                                                               iw = ow·S_w − P_w + kw.
// Why: oneDNN's backward-data for a first-layer shape is far from the FLOP rate (measured on the 2-core AMD VM:
// AlexNet conv1, 3→64, 11×11/4, batch 16: 56 ms for 2.25 GFLOP; DQN conv1, 4→32, 8×8/4: 2.6 ms for 26 MFLOP),
// while its weight gradient runs at the FLOP rate, so the op keeps oneDNN for dW and takes dx from here.
//
// Scatter form, one dx row (n, ih) per task (tasks own whole rows: no write conflicts): for each kh that reaches the
// row (oh = (ih + P_h − kh)/S_h integral and in range) and each ow, the KW·C contiguous values dx[n, ih, iw₀ .. iw₀ +
// KW − 1, 0 .. C − 1] (iw₀ = ow·S_w − P_w) receive dz[n, oh, ow, :] · Wₖₕ, Wₖₕ = W[:, :, kh, :] arranged
// [CO][KW·C] (padded with zeros to whole 8-lane vectors). That product runs over CO with the segment in NV
// vector registers, OB output columns at a time (each weight vector loaded once serves OB FMAs), and the segments
// are added into a zeroed, padded row buffer that is then copied out (positions no window reaches stay 0).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int L = 8;  // lanes: one 256-bit register (few-channel segments waste less than in 16-lane vectors)
typedef float v8 __attribute__((vector_size(32)));
constexpr int kMaxVectors = 8;  // KW·C ≤ 64

inline v8 loadu(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storeu(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

struct Geometry {
  int64_t n, h, w, c, oh, ow, co, kh, kw, sh, sw, ph, pw;
};

// OB columns ow .. ow + OB − 1 of one (row, kh) pair: buf[(ow + o)·S_w·C + ...] += dz[ow + o, :] · Wₖₕ.
template <int NV, int OB>
inline void columns(const float* g, const v8* wk, float* buf, int64_t ow, const Geometry& s) {
  v8 acc[OB][NV];
  for (int o = 0; o < OB; ++o)
    for (int v = 0; v < NV; ++v) acc[o][v] = v8{};
  const float* go = g + ow * s.co;
  for (int64_t co = 0; co < s.co; ++co) {
    const v8* wr = wk + co * NV;
    for (int o = 0; o < OB; ++o) {
      const float b = go[o * s.co + co];
      for (int v = 0; v < NV; ++v) acc[o][v] += b * wr[v];
    }
  }
  for (int o = 0; o < OB; ++o) {  // in column order: a segment overlaps the previous one when S_w < KW
    float* dst = buf + (ow + o) * s.sw * s.c;
    for (int v = 0; v < NV; ++v) storeu(dst + v * L, loadu(dst + v * L) + acc[o][v]);
  }
}

template <int NV>
void input_grad(const float* dz, const v8* wt, float* dx, const Geometry& s) {
  constexpr int OB = NV <= 2 ? 6 : NV <= 4 ? 3 : 2;  // OB·NV accumulators + NV weights within 32 registers
  const int64_t row_floats = ((s.ow - 1) * s.sw + s.kw) * s.c + NV * L;  // every segment, whole vectors
  const int64_t buf_floats = std::max(row_floats, (s.w + s.pw) * s.c);
  // one thread for small problems: a parallel region costs more than ~64K multiply-adds (torch's grain is 32K)
  const bool parallel = s.n * s.h * s.ow * s.co * s.kw * s.c > (int64_t(1) << 16);
#pragma omp parallel if (parallel)
  {
    std::vector<float> buf(static_cast<size_t>(buf_floats));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < s.n * s.h; ++r) {
      const int64_t n = r / s.h, ih = r % s.h;
      std::fill(buf.begin(), buf.end(), 0.f);
      for (int64_t kh = 0; kh < s.kh; ++kh) {
        const int64_t t = ih + s.ph - kh;
        if (t < 0 || t % s.sh) continue;
        const int64_t oh = t / s.sh;
        if (oh >= s.oh) continue;
        const float* g = dz + (n * s.oh + oh) * s.ow * s.co;
        const v8* wk = wt + kh * s.co * NV;
        int64_t ow = 0;
        for (; ow + OB <= s.ow; ow += OB) columns<NV, OB>(g, wk, buf.data(), ow, s);
        for (; ow < s.ow; ++ow) columns<NV, 1>(g, wk, buf.data(), ow, s);
      }
      // buf index (iw + P_w)·C + c ↔ dx[n, ih, iw, c]
      std::memcpy(dx + r * s.w * s.c, buf.data() + s.pw * s.c, sizeof(float) * s.w * s.c);
    }
  }
}

// dz: [N, OH, OW, CO] fp32 contiguous (channels_last); weight: [CO, C, KH, KW] fp32 contiguous; dx: [N, H, W, C].
void conv2d_input_grad(int64_t dz, int64_t weight, int64_t dx, int64_t n, int64_t c, int64_t h, int64_t w,
                       int64_t co, int64_t kh, int64_t kw, int64_t oh, int64_t ow, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw) {
  const Geometry s{n, h, w, c, oh, ow, co, kh, kw, sh, sw, ph, pw};
  const int64_t seg = kw * c, nv = (seg + L - 1) / L;
  if (nv > kMaxVectors || sh < 1 || sw < 1 || ph < 0 || pw < 0 || oh < 1 || ow < 1)
    throw std::invalid_argument("conv2d_input_grad: KW·C must be at most 64, strides positive, padding ≥ 0");
  // Wₖₕ[co][kw·C + c] = W[co, c, kh, kw], zero-padded to nv whole vectors
  std::vector<v8> wt(static_cast<size_t>(kh * co * nv), v8{});
  const float* wsrc = reinterpret_cast<const float*>(weight);
  float* wdst = reinterpret_cast<float*>(wt.data());
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t o = 0; o < co; ++o)
      for (int64_t j = 0; j < kw; ++j)
        for (int64_t ci = 0; ci < c; ++ci)
          wdst[(i * co + o) * nv * L + j * c + ci] = wsrc[((o * c + ci) * kh + i) * kw + j];
  const auto* g = reinterpret_cast<const float*>(dz);
  auto* out = reinterpret_cast<float*>(dx);
  switch (nv) {
    case 1: input_grad<1>(g, wt.data(), out, s); break;
    case 2: input_grad<2>(g, wt.data(), out, s); break;
    case 3: input_grad<3>(g, wt.data(), out, s); break;
    case 4: input_grad<4>(g, wt.data(), out, s); break;
    case 5: input_grad<5>(g, wt.data(), out, s); break;
    case 6: input_grad<6>(g, wt.data(), out, s); break;
    case 7: input_grad<7>(g, wt.data(), out, s); break;
    default: input_grad<8>(g, wt.data(), out, s); break;
  }
}

}  // namespace

void register_conv_input_grad(py::module_& m) {
  m.def("conv2d_input_grad", &conv2d_input_grad,
        "dx [N,H,W,C] of a stride/padding conv with KW·C ≤ 64 from dz [N,OH,OW,CO] and weight [CO,C,KH,KW], fp32",
        py::arg("grad_output"), py::arg("weight"), py::arg("grad_input"), py::arg("n"), py::arg("c"), py::arg("h"),
        py::arg("w"), py::arg("co"), py::arg("kh"), py::arg("kw"), py::arg("oh"), py::arg("ow"), py::arg("sh"),
        py::arg("sw"), py::arg("ph"), py::arg("pw"));
}
