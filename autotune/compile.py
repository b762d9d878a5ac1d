"""Compile a recorded launch for a GPU target without a GPU, and read its resource usage.

    usage = compile_launch(launch, capability=(8, 7))   # {"shared": bytes, "regs": n, "spills": bytes, ...}

Uses triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32)), which
Triton >= 3.3 accepts (the signature lists every parameter, constexprs included). Shared memory comes from the
compiled kernel's metadata. Registers and spills come from `cuobjdump -res-usage` on the cubin, else from
`ptxas -v` on the PTX (both ship with Triton's NVIDIA backend); when neither runs, the PTX's `.local`
declarations are the spill proxy and registers are left unknown (`regs_source` says which was used).
Under TRITON_INTERPRET=1 the kernels are interpreter objects, which cannot be compiled: run without it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import torch

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


class CompileUnavailable(RuntimeError):
    """Triton cannot compile for a GPU target here (interpreter mode, no NVIDIA backend, old Triton)."""


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    raise CompileUnavailable(f"{type(kernel).__name__} is not a JITFunction (TRITON_INTERPRET=1 is set?): "
                             "compile-only checks need the real Triton compiler")


def signature_of(launch):
    """(signature, constexprs, attrs) of a recorded launch, as triton.compile's ASTSource takes them."""
    from .launches import _constexpr_names

    fn = _jit_function(launch.kernel)
    constexpr = _constexpr_names(fn)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = launch.args.get(name)
        if name in constexpr or v is None:
            sig[name] = "constexpr"
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {name}={v!r}")
    return sig, consts, attrs


def _nvidia_tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _resources_from_cubin(cubin: bytes):
    tool = _nvidia_tool("cuobjdump")
    if tool is None or not cubin:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", out)
    return (int(m.group(1)), int(m.group(3)) + int(m.group(2))) if m else None


def _resources_from_ptxas(ptx: str, arch: str):
    tool = _nvidia_tool("ptxas")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)), int(spill.group(1)) if spill else 0) if regs else None


def ptx_local_bytes(ptx: str) -> int:
    """Bytes of .local arrays the PTX declares: local memory, the spill/stack proxy when no tool reports."""
    return sum(int(m) for m in re.findall(r"\.local\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\]", ptx))


def compile_launch(launch, capability=(8, 7)) -> dict:
    """Compile `launch` for sm_<capability>; {"shared", "regs", "spills", "num_warps", "num_stages", "regs_source"}.
    Raises whatever Triton raises for a config that does not compile, CompileUnavailable if nothing can."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # very old or partial Triton installs
        raise CompileUnavailable(f"this Triton has no ASTSource/GPUTarget API: {e}") from e
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise CompileUnavailable("TRITON_INTERPRET is set: the kernels are interpreter objects")
    sig, consts, attrs = signature_of(launch)
    fn = _jit_function(launch.kernel)
    cc = capability[0] * 10 + capability[1]
    options = {"num_warps": launch.options.get("num_warps", 4), "num_stages": launch.options.get("num_stages", 3)}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    except TypeError as e:
        raise CompileUnavailable(f"this Triton's ASTSource takes other arguments: {e}") from e
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    md = compiled.metadata
    shared = int(getattr(md, "shared", 0) or 0)
    asm = compiled.asm
    res, source = _resources_from_cubin(asm.get("cubin", b"")), "cuobjdump"
    if res is None:
        res, source = _resources_from_ptxas(asm.get("ptx", ""), f"sm_{cc}"), "ptxas"
    if res is None:
        res, source = (None, ptx_local_bytes(asm.get("ptx", ""))), "ptx-local"
    return dict(shared=shared, regs=res[0], spills=res[1], regs_source=source, **options)


def check_fits(usage: dict, profile) -> str | None:
    """Why a compiled kernel cannot run well on `profile` (None when it fits): shared memory over the
    per-block limit, registers over the per-thread limit, or any spill to local memory."""
    if usage["shared"] > profile.smem_per_block:
        return f"shared memory {usage['shared']} B > {profile.smem_per_block} B per block"
    if usage["regs"] is not None and usage["regs"] * 32 * usage["num_warps"] > profile.regs_per_sm:
        return f"{usage['regs']} registers x {usage['num_warps']} warps exceed the SM's register file"
    if usage["spills"]:
        return f"spills {usage['spills']} B to local memory"
    return None
