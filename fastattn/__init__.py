"""fastattn: hand-written attention, RoPE, RMSNorm and decode kernels for PyTorch.

    import fastattn
    y = fastattn.rms_norm(x, weight, eps=1e-6)

See README.md and DESIGN.md for the full API.
"""
from ._C_loader import load as _load

_C = _load()

from . import ops  # noqa: E402  (registers fake impls and autograd)
from . import reference  # noqa: E402
from .functional import *  # noqa: E402,F401,F403
from .functional import __all__ as _functional_all  # noqa: E402

from . import nn  # noqa: E402

__version__ = "0.1.0"
__all__ = list(_functional_all) + ["nn", "reference", "ops", "__version__"]


def cuda_built() -> bool:
    """True when this build of fastattn has its CUDA kernels."""
    return bool(_C.WITH_CUDA)
