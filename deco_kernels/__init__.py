"""deco_kernels: kernels, reference and modules for DECO-style ReLU-routed sparse Mixture-of-Experts."""
from . import ops, reference
from .config import DecoConfig
from .elastic import calibrate
from .modules import DecoForCausalLM, DecoMoE, SwiGLU
from .sparsity import SparsityController

__version__ = "0.1.0"
__all__ = ["DecoConfig", "DecoForCausalLM", "DecoMoE", "SparsityController", "SwiGLU", "calibrate", "ops",
           "reference", "__version__"]
