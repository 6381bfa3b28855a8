"""Drop-in ``nn`` modules over fastattn's functional ops."""
from .rms_norm import RMSNorm
from .rotary import RotaryEmbedding

__all__ = ["RMSNorm"]
__all__ += ["RotaryEmbedding"]
