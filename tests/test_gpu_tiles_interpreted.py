"""Every Triton op at the tile sizes it ships for GPUs, run through the interpreter on CPU tensors.

On CPU tensors the kernels otherwise take large interpreter tiles (its cost is per program), so the masks, block
ranges and multi-block reductions of the GPU tiles (2K-element batch-norm tiles over 32 channels, 4096-wide vocab
chunks, 64×64×32 implicit-GEMM tiles, ...) would first run on a GPU. Inside kernels._triton.interpret_gpu_tiles()
they run here, on shapes that are no multiple of any tile, against the reference backend in float64 (outputs and
every gradient). The attention kernels' tiles have their own test (test_attention.py, every GPU_TABLE tile)."""
import contextlib

import pytest
import torch

import dlcore
import dlcore.functional as D

triton = pytest.importorskip("triton")
from dlcore.kernels._triton import interpret_gpu_tiles  # noqa: E402  (after the skip: needs triton)


def _run(fn, inputs, backend_ctx):
    """fn(*inputs) and the gradients of every floating input for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with backend_ctx():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(7)
        douts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
        wrt = [t for t in leaves if t.requires_grad]
        diff = [(o, g) for o, g in zip(outs, douts) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], wrt, [g for _, g in diff], allow_unused=True) if diff else []
    return list(outs), list(grads)


def _reference():
    return dlcore.use_backend("reference")


@contextlib.contextmanager
def _triton_at_gpu_tiles():
    with dlcore.use_backend("triton"), interpret_gpu_tiles():
        yield


def _check(fn, inputs, atol=2e-4, rtol=2e-4, seed=0):
    """fn on fp32 copies through Triton at the GPU tiles against fn on the float64 inputs through the reference."""
    torch.manual_seed(seed)
    want, want_grads = _run(fn, inputs, _reference)
    torch.manual_seed(seed)  # the same dropout seed: every backend draws the same Philox mask
    low = [t.float() if t.is_floating_point() else t for t in inputs]
    got, got_grads = _run(fn, low, _triton_at_gpu_tiles)
    for name, g, w in [(f"output {i}", g, w) for i, (g, w) in enumerate(zip(got, want))] + \
                      [(f"grad {i}", g, w) for i, (g, w) in enumerate(zip(got_grads, want_grads))]:
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=name)


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_act(channels_last):
    # NCHW: 1-channel tiles of 2048 positions over 3 335 positions; channels_last: 32-channel tiles, 37 channels
    shape = (3, 37, 9, 11) if channels_last else (5, 3, 23, 29)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, r = (_randn(*shape).contiguous(memory_format=fmt) for _ in range(2))
    w, b = _randn(shape[1]), _randn(shape[1])
    _check(lambda x, r, w, b: D.batch_norm_act(x, None, None, w, b, True, residual=r), [x, r, w, b])
    _check(lambda x, w, b: D.batch_norm_act(x, None, None, w, b, True, activation="leaky_relu",
                                            negative_slope=0.2), [x, w, b])


@pytest.mark.parametrize("c_in,size", [(5, (17, 19)), (40, (9, 11))])
def test_conv2d_relu_maxpool2d_fused_implicit_gemm(c_in, size):
    # 70 output channels over 64-wide N tiles, the pooled positions over 64-row M tiles; 40 input channels: two
    # 32-deep K steps per kernel tap, the second partial
    x, w, b = _randn(2, c_in, *size), _randn(70, c_in, 3, 3, scale=0.3 / c_in ** 0.5), _randn(70)
    _check(lambda x, w, b: D.conv2d_relu_maxpool2d(x, w, b, padding=1, pool_kernel_size=3, pool_stride=2),
           [x, w, b], atol=2e-3, rtol=2e-3)  # tf32 dots on the GPU tiles


@pytest.mark.parametrize("activation,dropout_p", [("gelu_tanh", 0.0), ("relu", 0.3)])
def test_bias_act(activation, dropout_p):
    x, b = _randn(70, 300), _randn(300)  # 32×128 tiles
    _check(lambda x, b: D.bias_act(x, b, activation=activation, dropout_p=dropout_p), [x, b])


def test_cross_entropy_over_several_vocab_chunks():
    logits, target = _randn(5, 9000, scale=3.0), torch.randint(0, 9000, (5,))  # 4096-wide chunks: 3 of them
    target[2] = -100
    _check(lambda z: D.cross_entropy(z, target, label_smoothing=0.1), [logits])


@pytest.mark.parametrize("cols", [768, 1000])
def test_layer_norm_with_residual(cols):
    x, r, w, b = _randn(13, cols), _randn(13, cols), _randn(cols), _randn(cols)
    _check(lambda x, r, w, b: D.layer_norm(x, cols, w, b, residual=r), [x, r, w, b])


def test_nt_xent():
    z1, z2 = _randn(75, 100), _randn(75, 100)  # 150 rows over 32×64 tiles, d 100 in a 128 block
    _check(lambda a, b: D.nt_xent_loss(a, b, temperature=0.2), [z1, z2], atol=2e-3, rtol=2e-3)  # tf32 dots


def test_additive_attention():
    q, keys, v, values = _randn(3, 256), _randn(3, 45, 256), _randn(256), _randn(3, 45, 256)  # 8-row S blocks
    lengths = torch.tensor([45, 17, 1])
    _check(lambda q, k, v, h: D.additive_attention(q, k, v, h, lengths), [q, keys, v, values])


def test_gather_rows():
    from dlcore.rl.gather import gather_rows

    sources = [torch.randn(50, 3, 700), torch.randint(0, 255, (50, 2500), dtype=torch.uint8)]  # rows > 1K blocks
    index = torch.randint(0, 50, (33,))
    with dlcore.use_backend("triton"), interpret_gpu_tiles():
        got = gather_rows(sources, index)
    for g, s in zip(got, sources):
        assert torch.equal(g, s[index])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_takes_the_table_of_its_dtype(dtype, monkeypatch):
    """fp32 inputs take GPU_TABLE_FP32 (fp32 tiles need twice the shared memory and 3×TF32 dots more registers:
    the 16-bit table's tiles spill or overflow shared memory in fp32) and the 3×TF32 dot unless torch allows
    TF32; 16-bit inputs take GPU_TABLE. At those tiles the output and gradients match float64."""
    from dlcore.kernels import attention as KA
    from dlcore.ops import attention as A

    picked = []
    blocks = KA._blocks
    monkeypatch.setattr(KA, "_blocks", lambda *a: picked.append(a) or blocks(*a))
    q, k, v = _randn(1, 2, 150, 64), _randn(1, 2, 131, 64), _randn(1, 2, 131, 64)
    if dtype == torch.float32:
        _check(lambda q, k, v: A.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])
    else:  # a bf16 run against the same math in float64: bf16's rounding of the inputs and of P
        with dlcore.use_backend("triton"), interpret_gpu_tiles():
            o = A.scaled_dot_product_attention(*(t.to(dtype) for t in (q, k, v)), is_causal=True)
        want = torch.nn.functional.scaled_dot_product_attention(*(t.to(dtype).double() for t in (q, k, v)),
                                                                is_causal=True)
        torch.testing.assert_close(o.double(), want, atol=2e-2, rtol=2e-2)
    fp32 = dtype == torch.float32
    assert picked and all(a[3] and a[4] == fp32 for a in picked)  # on_gpu tiles, the dtype's table
    table = KA.GPU_TABLE_FP32 if fp32 else KA.GPU_TABLE
    assert [blocks(*a)[:2] for a in picked] == [table[a[0]][(64, False)][:2] for a in picked]
    assert KA.dot_precision(dtype) == ("tf32x3" if fp32 else "ieee")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert KA.dot_precision(dtype) == ("tf32" if fp32 else "ieee")
    finally:
        torch.set_float32_matmul_precision(before)


def test_fp32_attention_past_the_fp32_tables_runs_the_reference_or_refuses_by_name(monkeypatch):
    """No fp32 tile compiles clean at head dim 128 (GPU_TABLE_FP32 stops at 64): where triton is the default (a
    GPU; here the GPU tables on CPU tensors with triton made the default) the reference runs instead, and the
    triton backend asked for by name says why."""
    from dlcore import _dispatch
    from dlcore.ops import attention as A

    select, ran = _dispatch.select, []
    monkeypatch.setattr(_dispatch, "select", lambda name, device, dtype: ("triton", select(name, device, dtype)[1])
                        if name in (A.FORWARD, A.BACKWARD) else select(name, device, dtype))
    for name in (A.FORWARD, A.BACKWARD):
        impl = _dispatch.get_op(name).impls["reference"]
        monkeypatch.setattr(impl, "fn", lambda *a, _fn=impl.fn, _n=name: ran.append(_n) or _fn(*a))
    q, k, v = (torch.randn(1, 2, 9, 128, requires_grad=True) for _ in range(3))
    with interpret_gpu_tiles():
        o = A.scaled_dot_product_attention(q, k, v)
        o.sum().backward()
        assert ran == [A.FORWARD, A.BACKWARD]
        torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        with dlcore.use_backend("triton"), pytest.raises(dlcore.BackendUnavailableError, match="head dim 128"):
            A.scaled_dot_product_attention(q, k, v)
