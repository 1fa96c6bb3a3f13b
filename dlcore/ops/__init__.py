"""Ops: one module per op with its reference and backend launchers; importing registers them with the
dispatch point."""
from dlcore.ops import adam, attention, conv_relu  # noqa: F401
