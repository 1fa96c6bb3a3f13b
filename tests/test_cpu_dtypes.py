"""The storage conversions every C++ kernel uses (csrc/common/dtype.h) against torch's, bit for bit: all 65536
fp16/bf16 patterns upward, and fp32 downward on random values over every exponent, halfway cases, subnormals,
overflow, Inf and NaN."""
import pytest
import torch

from dlcore import _ext
from dlcore._ext import DTYPE_CODE

pytestmark = pytest.mark.skipif(_ext.cpu is None, reason="CPU extension not built")


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full(x.shape, 7, dtype=dtype)  # poisoned
    _ext.cpu.cast(x.data_ptr(), out.data_ptr(), x.numel(), DTYPE_CODE[x.dtype], DTYPE_CODE[dtype])
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a == b) & (torch.signbit(a) == torch.signbit(b)) | both_nan).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_upcasts_like_torch(dtype):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    assert _same(_cast(x, torch.float32), x.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_downcasts_round_to_nearest_even_like_torch(dtype):
    g = torch.Generator().manual_seed(0)
    mant = torch.rand(200_000, generator=g) + 1.0
    expo = torch.randint(-40, 40, (200_000,), generator=g).float()
    sign = torch.where(torch.rand(200_000, generator=g) < 0.5, -1.0, 1.0)
    x = sign * mant * torch.pow(2.0, expo)
    # exact halfway points between neighbouring values of `dtype` (ties go to even), and specials
    lo = torch.randn(10_000, generator=g).to(dtype)
    hi = torch.nextafter(lo.float(), torch.full_like(lo.float(), float("inf"))).to(dtype)
    halfway = (lo.double() + (hi.double() - lo.double()) / 2).float()
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.0, 65520.0, 1e38,
                             6e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-45, 2.0**-14, 2.0**-14 - 2.0**-26])
    x = torch.cat([x, halfway, specials, torch.randn(100_000, generator=g) * 1e-6])
    assert _same(_cast(x, dtype), x.to(dtype))


def test_unknown_dtype_code_is_a_value_error():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="dtype code"):
        _ext.cpu.cast(x.data_ptr(), x.data_ptr(), 4, 0, 9)
