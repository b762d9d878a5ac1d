"""deco_kernels: kernels, reference and modules for DECO-style ReLU-routed sparse Mixture-of-Experts."""
from . import ops, reference
from .config import DecoConfig

__version__ = "0.1.0"
__all__ = ["DecoConfig", "ops", "reference", "__version__"]
