"""Ops: one module per op with its reference and backend launchers; importing registers them with the
dispatch point."""
from dlcore.ops import additive_attention, adam, attention, batch_norm, bias_gelu, conv_pool, conv_relu, cross_entropy, layer_norm, nt_xent  # noqa: F401,E501
