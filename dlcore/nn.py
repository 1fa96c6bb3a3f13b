"""Drop-in layers: same constructor arguments and state_dict keys as the torch.nn modules they replace."""
from __future__ import annotations

import torch
from torch import nn

from dlcore.ops.conv_relu import conv2d_relu


class Conv2dReLU(nn.Conv2d):
    """nn.Conv2d followed by ReLU, as one op (dlcore.functional.conv2d_relu): same arguments, parameters and
    state_dict keys as nn.Conv2d (padding_mode 'zeros' only). Input [N, C_in, H, W] → [N, C_out, H', W']."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("Conv2dReLU supports padding_mode='zeros' with integer padding")

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, relu: nn.Module | None = None) -> "Conv2dReLU":
        """The fused layer holding `conv`'s parameters (shared, not copied) in place of (conv, relu)."""
        if relu is not None and not isinstance(relu, nn.ReLU):
            raise TypeError(f"expected nn.ReLU after the convolution, got {type(relu).__name__}")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        fused.weight, fused.bias = conv.weight, conv.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_relu(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
