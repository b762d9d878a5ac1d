"""Compile a recorded launch for a GPU target without a GPU, and read its resource usage.

    usage = compile_launch(launch, capability=(8, 7))   # {"shared": bytes, "regs": n, "spills": bytes, ...}

Uses triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32)), which
Triton >= 3.3 accepts (the signature lists every parameter, constexprs included). Shared memory comes from the
compiled kernel's metadata. Registers and spills come from `cuobjdump -res-usage` on the cubin, else from
`ptxas -v` on the PTX (both ship with Triton's NVIDIA backend); when neither runs, the PTX's `.local`
declarations are the spill proxy and registers are left unknown (`regs_source` says which was used).
Under TRITON_INTERPRET=1 the kernels are interpreter objects, which cannot be compiled: run without it.

UsageCache keeps compile results in a JSON file keyed by binary_key: what the compiled binary depends on.
A layer's d, N and T are runtime arguments of every kernel (deco_kernels/triton: only the tile sizes, DE and
the feature flags are tl.constexpr), so they enter the binary only through Triton's specialisation of runtime
ints (== 1, divisible by 16); one binary serves many geometries and token counts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings

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
    """(signature, constexprs, attrs) of a recorded launch, as triton.compile's ASTSource takes them. Runtime
    arguments are specialised as Triton's launcher does: an int equal to 1 becomes a constant, and ints and
    pointers get a 16-divisibility hint (so T=1 compiles the binary a T=1 call runs)."""
    from .launches import _arg_names, _constexpr_names

    constexpr = _constexpr_names(launch.kernel)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(_arg_names(launch.kernel)):
        v = launch.args.get(name)
        if name in constexpr or v is None or (type(v) is int and v == 1):
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


def binary_key(launch, capability) -> str:
    """What the binary compiled for `launch` depends on: kernel, constexprs, the runtime arguments'
    specialisation (types, divisibility, ints equal to 1), num_warps/num_stages, the arch and Triton's version."""
    import triton

    sig, consts, attrs = signature_of(launch)
    return json.dumps(dict(kernel=launch.name, constexprs={k: str(v) for k, v in consts.items()},
                           signature={k: v for k, v in sig.items() if v != "constexpr"},
                           divisible_by_16=sorted(i for (i,) in attrs),
                           num_warps=launch.options.get("num_warps", 4),
                           num_stages=launch.options.get("num_stages", 3),
                           arch=f"sm_{capability[0]}{capability[1]}", triton=triton.__version__), sort_keys=True)


class UsageCache:
    """compile_launch results on disk (a JSON file keyed by binary_key), so a re-run does not recompile.

    usage(launches) gives {kernel name: result} as model.works_of takes it, compiling only the launches whose
    binary the file lacks; kernels that fail to compile are remembered with their error and left out. A file
    that cannot be read is ignored with a warning (everything is recompiled) and replaced on save(), which
    writes atomically (a temporary file in the same folder, then os.replace)."""

    FORMAT = 1

    def __init__(self, path: str, capability, compile_fn=None):
        self.path, self.capability = path, tuple(capability)
        self.compile_fn = compile_fn or compile_launch
        self.entries = self._load()
        self.hits = self.compiled = 0
        self.unavailable = None      # why nothing can be compiled here (then misses stay unknown)
        self._dirty = False

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            if data.get("format") != self.FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a format-{self.FORMAT} usage cache")
            return data["entries"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            warnings.warn(f"{self.path}: unreadable compile-usage cache ({e}); recompiling", stacklevel=3)
            return {}

    def usage(self, launches) -> dict:
        out = {}
        for ln in launches:
            key = binary_key(ln, self.capability)
            if key in self.entries:
                self.hits += 1
            elif self.unavailable:
                continue
            else:
                try:
                    self.entries[key] = self.compile_fn(ln, self.capability)
                except CompileUnavailable as e:
                    self.unavailable = str(e)
                    continue
                except Exception as e:  # noqa: BLE001 - a config that does not compile is remembered as such
                    self.entries[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
                self.compiled += 1
                self._dirty = True
            if "error" not in self.entries[key]:
                out[ln.name] = self.entries[key]
        return out

    def save(self) -> None:
        if not self._dirty:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".usage-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dict(format=self.FORMAT, entries=dict(sorted(self.entries.items()))), f, indent=1)
                f.write("\n")
            os.chmod(tmp, 0o644)     # mkstemp's 0600 would make a shipped file private
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._dirty = False
