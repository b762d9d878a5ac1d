"""deco_kernels.cupy: the CuPy backend (CUDA C kernels compiled by NVRTC at run time). Same op names as
deco_kernels.reference; inference only.

``deco_ffn`` is imported lazily, so ``deco_kernels.cupy.geometry`` (the host-side plan) imports without cupy.
"""
__all__ = ["deco_ffn"]


def __getattr__(name):
    if name == "deco_ffn":
        from .ffn import deco_ffn
        globals()["deco_ffn"] = deco_ffn  # later lookups skip this hook
        return deco_ffn
    raise AttributeError(f"module 'deco_kernels.cupy' has no attribute {name!r}")
