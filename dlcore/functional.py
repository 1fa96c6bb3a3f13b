"""Functional forms of dlcore's ops, mirroring torch.nn.functional / torch.optim's functional API."""
from dlcore.ops.adam import adam
from dlcore.ops.attention import flash_attn_varlen_func, scaled_dot_product_attention
from dlcore.ops.conv_relu import conv2d_relu

__all__ = ["adam", "conv2d_relu", "flash_attn_varlen_func", "scaled_dot_product_attention"]
