"""dlcore: hand-written GPU kernels (Triton and CUDA C++) with fast CPU C++ twins for the models that made deep
learning. See README.md for the op table and ``dlcore info`` for what this installation can run."""
__version__ = "0.1.0"

from dlcore._dispatch import BACKENDS, BackendUnavailableError, use_backend  # noqa: E402
from dlcore import ops  # noqa: E402,F401  (registers every op with the dispatch point)
from dlcore import functional, nn, optim  # noqa: E402,F401
from dlcore._info import info  # noqa: E402
from dlcore.patching import fuse_for_inference, patch  # noqa: E402

__all__ = ["BACKENDS", "BackendUnavailableError", "use_backend", "functional", "nn", "optim", "info", "fuse_for_inference", "patch",
           "__version__"]
