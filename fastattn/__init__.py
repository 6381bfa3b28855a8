"""fastattn: hand-written attention, RoPE, RMSNorm and decode kernels for PyTorch.

    import fastattn
    y = fastattn.rms_norm(x, weight, eps=1e-6)

See README.md and DESIGN.md for the full API.
"""
from ._C_loader import load as _load
from ._C_loader import exit_if_command_line as _exit_if_command_line

try:
    _C = _load()
except ImportError as _error:
    _exit_if_command_line(_error)  # `python -m fastattn ...`: one line, not a traceback
    raise

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


def cpu_isa() -> str:
    """The instruction-set tier of the CPU kernels in use: "baseline" (any x86-64), "avx2"
    (x86-64-v3) or "avx512" (x86-64-v4) in a portable build, chosen at the first CPU kernel
    call as the best the CPU supports (FASTATTN_CPU_ISA=baseline|avx2|avx512 caps it);
    "native" / "custom" in a build with FASTATTN_CPU_MARCH=native / another -march."""
    return _C.cpu_isa()


__all__ += ["cpu_isa", "cuda_built"]
