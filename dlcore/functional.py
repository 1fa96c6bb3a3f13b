"""Functional forms of dlcore's ops, mirroring torch.nn.functional / torch.optim's functional API."""
from dlcore.ops.adam import adam

__all__ = ["adam"]
