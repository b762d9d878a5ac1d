"""deco_kernels.triton: the Triton backend. Same op names as deco_kernels.reference."""
from . import training  # noqa: F401  (registers the deco_kernels:: custom ops of the training path)
from .ffn import SMALL_BATCH_MAX, deco_ffn
from .regulariser import gate_stats
from .training import deco_ffn_from_gates

__all__ = ["deco_ffn", "deco_ffn_from_gates", "gate_stats", "SMALL_BATCH_MAX"]
