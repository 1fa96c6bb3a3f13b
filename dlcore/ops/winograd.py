"""Winograd F(4×4, 3×3) for the 3×3, stride-1 convolutions of a folded model in CPU inference (opt in:
`dlcore.fuse_for_inference(model, winograd=True)`).

A 4×4 block of outputs of one output channel o needs a 6×6 block d of each input channel c:
    y = Aᵀ [ Σ_c (G g_{o,c} Gᵀ) ⊙ (Bᵀ d_c B) ] A
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), with the interpolation points
0, 1, −1, 2, −1/2, ∞ rather than their 0, ±1, ±2, ∞: mixing a point and its reciprocal keeps the transforms'
constants small, the advice of Barabasz et al. ("Error analysis and improving the accuracy of Winograd
convolution for deep neural networks", 2020); of the sets {0, ±1, a, b} tried here (a, b from ±2, ±3, ±4 and their
reciprocals, ±3/2, ±2/3) it gave the least fp32 error.
For each of the 36 positions k of the transformed tile the sum over c is a matrix product, so the convolution is
    V[k] = (Bᵀ d B)[k]   [tiles, C_in]        input pass (C++, csrc/cpu/winograd.cpp)
    M[k] = V[k] @ U[k]   [tiles, C_out]       36 GEMMs in one torch.bmm, U[k] = (G g Gᵀ)[k] [C_in, C_out]
    y    = Aᵀ M A + bias (+ residual), ReLU   output pass (C++), into a channels_last output
4 multiplies per output instead of 9; the transforms are adds and small constants. U is computed once per weight,
in float64, and cached by the caller (blocks.FoldedConv2d).

Accuracy (largest error against a float64 convolution, relative to the largest output, ResNet-18's 3×3 shapes):
a bare convolution 2.8–3.3e-6 against 2.6–3.5e-7 for oneDNN's direct one (8–11×; Lavin & Gray's points: 7–9e-6,
20–32×); with the bias, residual and ReLU of a ResNet block 1.6–2.1e-6 against 0.8–1.4e-6 (1.3–2.7×); at
ResNet-18's logits (B8) 4.6e-7 against 3.7e-7 for the stock fp32 model. Hence opt in (like TF32 on a GPU). In
float64 the same code is exact to ~1e-14 (the tests check the algorithm there).

Speed on the 2-core AMD EPYC VM, B8 fp32 channels_last, conv + bias + residual + ReLU (median of 15, one process,
against oneDNN's fused convolution with prepacked weights): 64ch 56² 8.65 → 5.94 ms, 128ch 28² 8.32 → 4.42,
256ch 14² 7.72 → 4.61, 512ch 7² 6.98 → 5.63. The GEMMs run at ~130 GFLOP/s (oneDNN's direct convolution ~220), so
the gain is ~2.25× less work at ~0.6× the rate; V and M are one workspace per thread, kept between calls (a fresh
30 MB block is page-faulted in on every call on this VM), split into tile chunks only past WORKSPACE_CHUNK_BYTES
(smaller chunks measured slower: each re-reads U and the GEMMs get shorter).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from dlcore import _ext

# F(4×4, 3×3) transform matrices for the interpolation points 0, 1, −1, 2, −1/2, ∞ (float64; V = Bᵀ d B,
# U = G g Gᵀ, y = Aᵀ M A). Lavin & Gray's points 0, ±1, ±2, ∞ gave 2.5–3× the fp32 error (see the docstring).
BT = torch.tensor([[1, 1.5, -2, -1.5, 1, 0], [0, -1, -2.5, -0.5, 1, 0], [0, 1, 0.5, -2.5, 1, 0],
                   [0, -0.5, -1, 0.5, 1, 0], [0, 2, -1, -2, 1, 0], [0, 1, 1.5, -2, -1.5, 1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [-1 / 3, -1 / 3, -1 / 3], [1 / 3, -1 / 3, 1 / 3], [1 / 15, 2 / 15, 4 / 15],
                  [-16 / 15, 8 / 15, -4 / 15], [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -0.5, 0], [0, 1, 1, 4, 0.25, 0], [0, 1, -1, 8, -0.125, 1]],
                  dtype=torch.float64)
TILE = 4  # outputs per tile side
WORKSPACE_CHUNK_BYTES = 512 << 20  # V + M of one pass at most; beyond it the tiles go in chunks
_workspace = threading.local()


def applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """This path computes conv2d(x, weight, stride=stride, ...) exactly in the math (fp32/fp64 CPU, 3×3, stride 1,
    dilation 1, one group, symmetric-or-not integer padding, a non-empty output)."""
    if x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return False
    if weight.dtype != x.dtype or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or groups != 1:
        return False
    if weight.shape[1] != x.shape[1]:  # (the general path raises the convolution's own error)
        return False
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or min(padding) < 0 or x.numel() == 0:
        return False
    return x.shape[2] + 2 * padding[0] >= 3 and x.shape[3] + 2 * padding[1] >= 3


MIN_TILES = 8                 # the GEMMs must outweigh reading U (4× the weights, from memory once past the cache):
U_BYTES_PER_TILE = 1.2e6      # at least one tile per 1.2 MB of U and MIN_TILES; and the tiles may pad the output by
MAX_PADDED_FRACTION = 1.5     # at most 1.5× (a 7² output in 8² of tiles: 1.31×; 6²: 1.78×)


def worthwhile(n: int, h_out: int, w_out: int, c_in: int, c_out: int, itemsize: int = 4) -> bool:
    """Whether Winograd should beat the direct convolution for this output size (fp32 measurements on the AMD VM,
    3×3 convolution + bias + ReLU against oneDNN's: 512 channels at 7² 0.39× for batch 1 (4 tiles), 0.79× for 4
    (16), 1.25× for 8 (32); 256 at 14², batch 1 (16 tiles): 1.53×; 256 at 4², batch 2 (2 tiles): 0.71×; 256 at
    6² (1.78× padded): 0.85×; 64 at 5² (2.56×): 0.66×)."""
    th, tw = _tiles(h_out, w_out)
    tiles = n * th * tw
    u_bytes = 36 * c_in * c_out * itemsize
    padded = (TILE * th * TILE * tw) / (h_out * w_out)
    return tiles >= max(MIN_TILES, u_bytes / U_BYTES_PER_TILE) and padded <= MAX_PADDED_FRACTION


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """U [36, C_in, C_out] = (G g Gᵀ) for every (C_out, C_in) 3×3 filter g, computed in float64, in weight's dtype."""
    g = G.to(weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _tiles(h_out: int, w_out: int) -> tuple[int, int]:
    return -(-h_out // TILE), -(-w_out // TILE)


def output_size(h: int, w: int, padding) -> tuple[int, int]:
    """(H', W') of a 3×3 stride-1 convolution of an h×w input with `padding` (a pair)."""
    return h + 2 * padding[0] - 2, w + 2 * padding[1] - 2


def reference_conv(x, u, bias, residual, padding, relu: bool) -> torch.Tensor:
    """The same algorithm in torch ops (any device, NCHW out): the passes' twin."""
    n, c, h, w = x.shape
    k = u.shape[2]
    ho, wo = output_size(h, w, padding)
    th, tw = _tiles(ho, wo)
    bt, at = BT.to(x), AT.to(x)
    # zero padding: `padding` before, and after up to the last tile's 6×6 window
    xp = torch.nn.functional.pad(x, (padding[1], TILE * tw + 2 - w - padding[1],
                                     padding[0], TILE * th + 2 - h - padding[0]))
    d = xp.unfold(2, 6, TILE).unfold(3, 6, TILE)                       # [n, c, th, tw, 6, 6]
    v = torch.einsum("ai,nctuij,bj->abntuc", bt, d, bt).reshape(36, -1, c)
    m = torch.bmm(v, u).reshape(6, 6, n, th, tw, k)
    y = torch.einsum("ai,ijntuo,bj->notaub", at, m, at).reshape(n, k, TILE * th, TILE * tw)[:, :, :ho, :wo]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return y.clamp_min(0) if relu else y


def _buffer(elements: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's workspace, grown (never shrunk) to `elements`; see the module docstring."""
    ws = getattr(_workspace, str(dtype), None)
    if ws is None or ws.numel() < elements:
        # a normal tensor even when first made under torch.inference_mode: an inference tensor could not be written
        # by a later call outside it ("Inplace update to inference tensor outside InferenceMode")
        with torch.inference_mode(False):
            ws = torch.empty(elements, dtype=dtype)
        setattr(_workspace, str(dtype), ws)
    return ws


def release_workspace() -> None:
    """Free this thread's Winograd workspace (it is kept between calls; it is as large as V and M of the largest
    convolution run: 36 · tiles · (C_in + C_out) elements)."""
    _workspace.__dict__.clear()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
            padding, relu: bool) -> torch.Tensor:
    """relu?(conv2d(x, w, bias, padding=padding) + residual) from u = transform_weight(w); channels_last output.
    x, u, bias, residual: CPU, fp32 or fp64, one dtype (the caller checks `applies`)."""
    from dlcore.ops.batch_norm import as_layout

    if _ext.cpu is None:
        return reference_conv(x, u, bias, residual, padding, relu).contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    k = u.shape[2]
    ho, wo = output_size(h, w, padding)
    th, tw = _tiles(ho, wo)
    tiles = n * th * tw
    x = as_layout(x, True)
    residual = None if residual is None else as_layout(residual, True)
    fp64 = x.dtype == torch.float64
    per_tile = 36 * (c + k)
    chunk = max(1, min(tiles, WORKSPACE_CHUNK_BYTES // (per_tile * x.element_size())))
    ws = _buffer(per_tile * chunk, x.dtype)
    y = torch.empty((n, k, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
    bias = None if bias is None else bias.contiguous()  # (held until the passes are done)
    bias_addr = 0 if bias is None else bias.data_ptr()
    res_addr = 0 if residual is None else residual.data_ptr()
    for first in range(0, tiles, chunk):
        count = min(chunk, tiles - first)
        v = ws[:36 * count * c].view(36, count, c)
        m = ws[36 * count * c:36 * count * (c + k)].view(36, count, k)
        _ext.cpu.winograd_input(x.data_ptr(), v.data_ptr(), n, h, w, c, padding[0], padding[1], th, tw, first,
                                count, fp64)
        torch.bmm(v, u, out=m)
        _ext.cpu.winograd_output(m.data_ptr(), y.data_ptr(), bias_addr, res_addr, n, ho, wo, k, th, tw, first,
                                 count, relu, fp64)
    return y
