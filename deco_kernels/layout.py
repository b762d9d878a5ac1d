"""Derived weight layouts the kernels read, computed once per weight version and cached.

Every backend reads the canonical weights in place (w_up's expert slabs are contiguous rows; w_down's expert blocks
are 2*de-byte row segments); the only derived tensors are wbar, the fp32 mean of w_up's rows, which turns the
global NormSiLU mean into one dot product per token, and its split into three bf16 rows (mean_split) for the
tensor-core router. The cache is keyed by the tensor's storage and its version counter, so an optimizer step or a
load_state_dict (both bump the version or change the storage) refreshes it, and a module and a functional caller
share it. A refill that bypasses the version counter (writes through ``.data``, as FSDP's all-gather into a
persistent buffer does) is invisible to it: the training path therefore never uses the cache (``cached=False``),
and inference after such a refill needs ``clear_cache()``.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch.utils.weak import WeakIdKeyDictionary

_CACHE_SIZE = 64
_cache: "OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]]" = OrderedDict()
_splits = WeakIdKeyDictionary()   # wbar -> mean_split(wbar)


def _key(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _mean(w_up: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.mean(w_up.detach(), dim=0, dtype=torch.float32)  # fp32 sums, no fp32 copy of w_up


def _split(wbar: torch.Tensor) -> torch.Tensor:
    # Five elementwise launches: the training path recomputes wbar, and so this, every step.
    with torch.no_grad():
        parts = torch.empty(3, wbar.shape[0], device=wbar.device, dtype=torch.bfloat16)
        parts[0].copy_(wbar)
        rest = wbar - parts[0]             # exact in fp32
        parts[1].copy_(rest)
        parts[2].copy_(rest.sub_(parts[1]))
        return parts


def _cached(t: torch.Tensor, make) -> torch.Tensor:
    """make(t), cached per (tensor, storage, version) of t."""
    key = _key(t)
    hit = _cache.get(key)
    # The weak reference guards against a new tensor reusing a dead one's id and memory.
    if hit is not None and hit[0]() is t:
        _cache.move_to_end(key)
        return hit[1]
    out = make(t)
    _cache[key] = (weakref.ref(t), out)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return out


def expert_mean(w_up: torch.Tensor, cached: bool = True) -> torch.Tensor:
    """wbar = mean of the rows of w_up, fp32 [d]; cached per (tensor, storage, version) of w_up unless
    ``cached=False``."""
    return _cached(w_up, _mean) if cached else _mean(w_up)


def mean_split(wbar: torch.Tensor) -> torch.Tensor:
    """wbar (fp32 [d]) as three bf16 rows [3, d], hi, mid and lo, each the bf16 rounding of what the rows before
    it leave: their fp32 sum is wbar to within fp32 rounding (bf16 has fp32's exponent range, so no part
    underflows short of fp32's own subnormals), and each part times a bf16 number is exact in fp32, so
    x . wbar can run on tensor cores beside the router logits. Kept as long as wbar lives (wbar is never
    written in place): a cached wbar keeps its split, the training path's per-step wbar drops it."""
    split = _splits.get(wbar)
    if split is None:
        split = _splits[wbar] = _split(wbar)
    return split


def clear_cache() -> None:
    _cache.clear()
    _splits.clear()
