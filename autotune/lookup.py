"""Runtime lookup of tuned configs: config_for(path, device, T, dtype, d, n, de, ds) -> dict | None.

Sources, first hit wins: the directory in DECO_KERNELS_TUNE_DIR, the user cache directory
($XDG_CACHE_HOME/deco_kernels/autotune, else ~/.cache/deco_kernels/autotune), the caches shipped in the package
(autotune/caches/*.json), then None: the launcher's heuristic default (ffn.small_batch_config /
grouped_config). DECO_KERNELS_AUTOTUNE=0 skips the files (always None).

A file counts for a device when its "device" fingerprint (name + compute capability + SM count) matches; when
several files of one directory match (Orin NX 16GB and Orin Nano 8GB share one), the one whose memory size is
closest wins. A corrupt, stale or incompatible file gives one warnings.warn and is skipped; so does an entry
with unknown keys, or one lacking a key its kernel now reads (tuned for an earlier kernel). One log line per
(device, source) says which was used. Results are memoised per (device, path, geometry, bucket): after the
first call of a bucket a lookup is one dict access, with no file I/O (safe under torch.compile, whose custom
ops call the launchers outside tracing anyway).
"""
from __future__ import annotations

import glob
import logging
import os
import threading
import warnings

from . import buckets
from .cache import CacheError, load
from .space import default_config, missing_keys

log = logging.getLogger("deco_kernels.autotune")
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caches")

_memo: dict = {}
_devices: dict = {}        # device index -> (fingerprint info, [(source label, path, entries)])
_logged: set = set()
_lock = threading.Lock()


def user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deco_kernels", "autotune")


def search_dirs() -> list[tuple[str, str]]:
    """(label, directory) in lookup order."""
    out = []
    env = os.environ.get("DECO_KERNELS_TUNE_DIR")
    if env:
        out.append(("DECO_KERNELS_TUNE_DIR", env))
    out.append(("user cache", user_cache_dir()))
    out.append(("shipped", SHIPPED_DIR))
    return out


def _pick(directory: str, device: dict):
    """(path, data) of the matching cache in `directory` (None if none); warns about unusable files."""
    found = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            data = load(path)
        except CacheError as e:
            warnings.warn(f"deco_kernels.autotune: ignoring {e}", stacklevel=4)
            continue
        if data["device"]["fingerprint"] == device["fingerprint"]:
            found.append((path, data))
    if not found:
        return None
    mem = device.get("memory_gb") or 0
    return min(found, key=lambda pd: abs((pd[1]["device"].get("memory_gb") or 0) - mem))


def sources_for(device: dict) -> list[tuple[str, str, dict]]:
    """[(source label, file path, entries)] of the caches that serve `device`, in lookup order."""
    out = []
    for label, directory in search_dirs():
        if os.path.isdir(directory):
            hit = _pick(directory, device)
            if hit is not None:
                out.append((label, hit[0], hit[1]["entries"]))
    return out


def _device_key(device):
    """A hashable key of `device`: a CUDA index, a fingerprint for a described device (dict), None otherwise."""
    if isinstance(device, dict):
        return device["fingerprint"]
    import torch

    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _device_state(key, device):
    state = _devices.get(key)
    if state is None:
        from .devices import describe_device

        info = device if isinstance(device, dict) else describe_device(key)
        state = (info, sources_for(info))
        _devices[key] = state
    return state


def _known_keys(path: str, T: int, dtype) -> set:
    from .space import spaces_for

    known = set(default_config(path, T, dtype)) | {"block_k", "up_stages"}
    return known.union(*spaces_for(path, T))


def _resolve(dkey, device, path: str, T: int, dtype, d, n, de, ds):
    info, sources = _device_state(dkey, device)
    key = buckets.entry_key(path, d, n, de, ds, dtype, T)
    for label, file, entries in sources:
        entry = entries.get(key)
        if entry is None:
            continue
        cfg = entry["config"]
        unknown = set(cfg) - _known_keys(path, T, dtype)
        if unknown:
            warnings.warn(f"deco_kernels.autotune: ignoring entry {key} of {file}: unknown config keys "
                          f"{sorted(unknown)} (incompatible)", stacklevel=3)
            continue
        missing = missing_keys(path, cfg, T, dtype)
        if missing:
            warnings.warn(f"deco_kernels.autotune: ignoring entry {key} of {file}: tuned for an earlier kernel "
                          f"(no {sorted(missing)}); re-run deco-kernels tune", stacklevel=3)
            continue
        _log_once(info, label, f"{label}: {file}")
        return dict(cfg)     # complete: it holds every key of its regime's default
    _log_once(info, "default", "heuristic defaults (no tuned entry)")
    return None


def _log_once(info: dict, label: str, what: str) -> None:
    if (info["fingerprint"], label) not in _logged:
        _logged.add((info["fingerprint"], label))
        log.info("deco_kernels.autotune: %s uses %s", info["fingerprint"], what)


def config_for(path: str, device, T: int, dtype, d: int, n: int, de: int, ds: int) -> dict | None:
    """Tuned config of kernel path `path` ("small_batch" or "grouped") for T tokens of a layer (d, N, de, ds) in
    `dtype` on CUDA `device` (torch.device, index, None for the current one, or a devices.describe_device dict);
    None means: use the launcher's heuristic default (also for non-CUDA devices, e.g. the interpreter's CPU
    tensors). Never raises for a bad cache file (it warns and falls through)."""
    if os.environ.get("DECO_KERNELS_AUTOTUNE", "1") == "0":
        return None
    dkey = _device_key(device)
    if dkey is None:
        return None
    key = (dkey, path, d, n, de, ds, str(dtype), buckets.bucket_of(T))
    try:
        return _memo[key]
    except KeyError:
        pass
    with _lock:
        if key not in _memo:
            try:
                _memo[key] = _resolve(dkey, device, path, T, dtype, d, n, de, ds)
            except Exception as e:  # noqa: BLE001 - a lookup must never break a forward pass
                warnings.warn(f"deco_kernels.autotune: lookup failed ({type(e).__name__}: {e}); using defaults",
                              stacklevel=2)
                _memo[key] = None
        return _memo[key]


def clear() -> None:
    """Forget memoised lookups and devices (after writing a cache, or in tests)."""
    with _lock:
        _memo.clear()
        _devices.clear()
        _logged.clear()
