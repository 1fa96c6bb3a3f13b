"""Functional forms of dlcore's ops, mirroring torch.nn.functional / torch.optim's functional API."""
from dlcore.ops.adam import adam
from dlcore.ops.additive_attention import additive_attention
from dlcore.ops.batch_norm import batch_norm_act
from dlcore.ops.attention import flash_attn_varlen_func, scaled_dot_product_attention
from dlcore.ops.bias_gelu import bias_act, bias_gelu, dropout, linear, linear_act, linear_gelu
from dlcore.ops.conv_pool import conv2d_relu_maxpool2d
from dlcore.ops.conv_relu import conv2d_relu
from dlcore.ops.cross_entropy import cross_entropy, linear_cross_entropy
from dlcore.ops.layer_norm import layer_norm
from dlcore.ops.nt_xent import nt_xent_loss

__all__ = ["adam", "additive_attention", "batch_norm_act", "bias_act", "bias_gelu", "conv2d_relu", "conv2d_relu_maxpool2d", "cross_entropy", "dropout", "flash_attn_varlen_func", "layer_norm", "linear", "linear_act",
           "linear_cross_entropy", "linear_gelu", "nt_xent_loss", "scaled_dot_product_attention"]
