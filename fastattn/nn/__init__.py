"""Drop-in ``nn`` modules over fastattn's functional ops."""
from .rms_norm import RMSNorm

__all__ = ["RMSNorm"]
