"""deco_kernels.triton: the Triton backend. Same op names as deco_kernels.reference."""
from .ffn import SMALL_BATCH_MAX, deco_ffn

__all__ = ["deco_ffn", "SMALL_BATCH_MAX"]
