"""Packaging: the optional GPU packages stay optional, and nothing top-level named `reference` or `autotune`
gets installed (pyproject maps both folders into the deco_kernels namespace)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

import deco_kernels

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, drop_pythonpath: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment, from ``cwd``."""
    env = dict(os.environ)
    env.pop("DECO_BACKEND", None)
    if drop_pythonpath:
        env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_import_without_triton_and_cupy(tmp_path):
    # None in sys.modules makes `import triton` raise ImportError and find_spec("triton") return None,
    # exactly as when the package is not installed.
    proc = run_python("""
        import sys
        for name in ("triton", "cupy", "cupyx"):
            sys.modules[name] = None
        import importlib.util
        assert importlib.util.find_spec("triton") is None
        import torch
        import deco_kernels
        from deco_kernels import backends, ops, reference

        assert not backends.available("triton", torch.device("cpu"))
        assert not backends.available("cupy", torch.device("cpu"))
        assert backends.resolve("auto", torch.device("cpu")) == "torch"
        T, d, N, de, ds = 3, 8, 5, 4, 6
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, d, generator=g)
        w = dict(w_router=torch.randn(N, d, generator=g), router_scale=torch.ones(N), w_up=torch.randn(N * de, d, generator=g),
                 gamma=torch.ones(de), w_down=torch.randn(d, N * de, generator=g), ws_gate=torch.randn(ds, d, generator=g),
                 ws_up=torch.randn(ds, d, generator=g), ws_down=torch.randn(d, ds, generator=g))
        y = ops.deco_ffn(x, **w, backend="auto")
        assert y.shape == (T, d)
        assert torch.equal(y, reference.deco_ffn(x, **w))
        assert sys.modules.get("triton") is None and sys.modules.get("cupy") is None
        print("ok")
    """, cwd=tmp_path)
    assert proc.stdout.strip().endswith("ok")


def test_reference_is_a_subpackage():
    import deco_kernels.reference as ref
    from deco_kernels.reference import ops as ref_ops

    assert ref.deco_ffn is ref_ops.deco_ffn
    assert deco_kernels.reference is ref
    assert importlib.util.find_spec("deco_kernels.autotune") is not None


def test_no_top_level_reference_or_autotune(tmp_path):
    # From a directory outside the repository (and without PYTHONPATH), a top-level `reference` or `autotune`
    # may exist only if some other project installed it, never resolving into this repository.
    proc = run_python(f"""
        import importlib.util
        from pathlib import Path
        import deco_kernels
        repo = Path({str(REPO)!r}).resolve()
        for name in ("reference", "autotune"):
            spec = importlib.util.find_spec(name)
            origin = spec and (spec.origin or str(list(spec.submodule_search_locations or [])))
            assert spec is None or str(repo) not in str(origin), f"{{name}} importable from {{origin}}"
        print(Path(deco_kernels.__file__).resolve())
    """, cwd=tmp_path, drop_pythonpath=True)
    assert proc.stdout.strip()


def test_pyproject_installs_only_the_deco_kernels_namespace():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = tool.get("packages", [])
    assert packages and all(p == "deco_kernels" or p.startswith("deco_kernels.") for p in packages), packages
    assert all(k == "deco_kernels" or k.startswith("deco_kernels.") for k in tool.get("package-dir", {}))


def _can_build_wheel() -> bool:
    """Offline build without isolation: setuptools >= 70.1 has bdist_wheel built in; 64..70 need `wheel`."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    return version >= (70, 1) or (version >= (64,) and importlib.util.find_spec("wheel") is not None)


@pytest.mark.skipif(not _can_build_wheel(), reason="needs setuptools>=70.1 (or >=64 with wheel) to build offline")
def test_wheel_has_no_top_level_reference_or_autotune(tmp_path):
    # The wheel is what a user installs: every file in it must live under deco_kernels/ or its metadata.
    # Build from a copy, so the build leaves no build/ or egg-info behind in the repository.
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md", "deco_kernels", "reference", "autotune"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        elif (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("placeholder\n")    # pyproject names it as the readme
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    (wheel,) = tmp_path.glob("deco_kernels-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"deco_kernels"}, tops
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every subpackage and its data files ship: the kernels of both backends, the CUDA source NVRTC compiles
    # at run time and the tune caches the lookup reads.
    for path in ("deco_kernels/reference/ops.py", "deco_kernels/autotune/__init__.py", "deco_kernels/triton/ffn.py",
                 "deco_kernels/cupy/decode.cu", "deco_kernels/cupy/common.cuh"):
        assert path in names, path
    shipped = {p.name for p in (REPO / "autotune" / "caches").glob("*.json")}
    assert shipped and {f"deco_kernels/autotune/caches/{n}" for n in shipped} <= names
