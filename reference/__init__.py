"""deco_kernels.reference: the plain-PyTorch ground truth of every DECO op and of the full model.

Installed as ``deco_kernels.reference`` (the folder is reference/ at the top of the repository)."""
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__all__ = list(_ops_all)
from . import model  # noqa: E402,F401
