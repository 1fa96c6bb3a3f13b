"""Triton kernels (installed as ``dlcore.kernels``). Each module holds the kernels and launchers of one op; the
autograd/dispatch glue lives in ``dlcore/ops``. Importing this package needs triton."""
