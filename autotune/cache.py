"""Tune cache files: JSON keyed by a device fingerprint, stamped with versions and the date; atomic merges.

One file per device in a directory (the tuner names it <fingerprint>.json; any *.json whose "device" matches
is read). Layout:

    {"format": 1, "source": "measured" | "modelled",
     "device": {"name", "capability", "sms", "memory_gb", "fingerprint"},
     "versions": {"deco_kernels", "triton", "torch"}, "date": ISO-8601 UTC,
     "entries": {"<path>/<geometry>/<bucket>": {"config": {...}, "us": .., "default_us": .., "T": ..,
                 "candidates": [{"config", "us" | null, "error"?, "model_us"?}, ...], "date", "versions"}}}

Staleness (decided here, documented in README/ENVs): a file written by another deco_kernels major.minor, or by
another Triton major, is stale: its configs were chosen for other kernels or another compiler. A different
"format" or a malformed layout is incompatible. Both make `load` raise CacheError; the lookup turns that into a
warning and falls through to the next source.

Writes merge under an exclusive lock file (fcntl, where available) and re-read the current file first, then
write a temporary file in the same directory and os.replace it over the target, so readers see the old or the
new file, never half of one, and two tuners writing at once keep both sets of entries.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile

from .buckets import is_current

FORMAT = 1


class CacheError(ValueError):
    """A cache file that is corrupt, stale or incompatible (the message says which)."""


def versions() -> dict:
    import torch

    from deco_kernels import __version__

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"deco_kernels": __version__, "triton": tv, "torch": torch.__version__}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _major_minor(v: str | None, parts: int):
    return None if v is None else tuple(v.split("+")[0].split(".")[:parts])


def stale_reason(file_versions: dict, current: dict | None = None) -> str | None:
    current = current or versions()
    if _major_minor(file_versions.get("deco_kernels"), 2) != _major_minor(current["deco_kernels"], 2):
        return f"written by deco_kernels {file_versions.get('deco_kernels')}, this is {current['deco_kernels']}"
    fv, cv = file_versions.get("triton"), current.get("triton")
    if fv and cv and _major_minor(fv, 1) != _major_minor(cv, 1):
        return f"written with triton {fv}, this is {cv}"
    return None


def load(path: str, check_versions: bool = True) -> dict:
    """The parsed cache at `path`; CacheError if it is corrupt, stale or incompatible."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{path}: incompatible (format {data.get('format') if isinstance(data, dict) else None!r},"
                         f" expected {FORMAT})")
    dev, entries = data.get("device"), data.get("entries")
    if (not isinstance(dev, dict) or not isinstance(dev.get("fingerprint"), str) or not isinstance(entries, dict)
            or not all(isinstance(e, dict) and isinstance(e.get("config"), dict) for e in entries.values())):
        raise CacheError(f"{path}: incompatible (no device fingerprint or malformed entries)")
    if check_versions:
        reason = stale_reason(data.get("versions") or {})
        if reason:
            raise CacheError(f"{path}: stale ({reason})")
    return data


@contextlib.contextmanager
def _locked(path: str):
    lock_path = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".lock")
    with open(lock_path, "a+") as lock:
        try:
            import fcntl
        except ImportError:   # no fcntl (Windows): the re-read-merge-replace still applies, without the lock
            fcntl = None
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def atomic_write_json(path: str, data: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600; a shipped or shared cache must be readable
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def merge_entries(directory: str, device: dict, entries: dict, source: str = "measured",
                  filename: str | None = None) -> str:
    """Add `entries` to the cache of `device` in `directory` (created if needed); returns the file's path.
    Entries already there stay unless `entries` has the same key, or their token bucket is no longer one of
    buckets.BUCKETS (the lookup never asks for it again); a corrupt or stale file is replaced."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename or f"{device['fingerprint']}.json")
    with _locked(path):
        try:
            old = load(path) if os.path.exists(path) else None
        except CacheError:
            old = None
        if old is not None and old["device"]["fingerprint"] != device["fingerprint"]:
            raise CacheError(f"{path} holds device {old['device']['fingerprint']}, not {device['fingerprint']}")
        merged = {k: v for k, v in old["entries"].items() if is_current(k)} if old else {}
        merged.update(entries)
        sources = {source} | ({old.get("source")} if old else set())
        data = {"format": FORMAT, "source": source if len(sources) == 1 else "mixed", "device": device,
                "versions": versions(), "date": now(), "entries": merged}
        atomic_write_json(path, data)
    return path
