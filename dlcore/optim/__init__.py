"""Fused optimizers, drop-in for torch.optim."""
from dlcore.optim.adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
