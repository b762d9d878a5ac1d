"""Derived weight layouts the kernels read, computed once per weight version and cached.

Every backend reads the canonical weights in place (w_up's expert slabs are contiguous rows; w_down's expert blocks
are 2*de-byte row segments); the only derived tensor is wbar, the fp32 mean of w_up's rows, which turns the global
NormSiLU mean into one dot product per token (expert_mean here; the Triton backend computes it with its bf16 split
for the tensor-core router in one launch, triton/means.py, and caches it through ``memoize``). The cache is keyed by
what makes the value and by the tensor's storage and version counter, so an optimizer step or a load_state_dict
(both bump the version or change the storage) refreshes it, and a module and a functional caller share it. A
refill that bypasses the version counter (writes through ``.data``, as FSDP's all-gather into a persistent buffer
does) is invisible to it: the training paths therefore never use the cache, and inference after such a refill
needs ``clear_cache()``.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

_CACHE_SIZE = 64
_cache: "OrderedDict[tuple, tuple[weakref.ref, object]]" = OrderedDict()


def _key(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _mean(w_up: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.mean(w_up.detach(), dim=0, dtype=torch.float32)  # fp32 sums, no fp32 copy of w_up


def memoize(t: torch.Tensor, make):
    """make(t), cached per (make, tensor, storage, version) of t."""
    key = (make, *_key(t))
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
    return memoize(w_up, _mean) if cached else _mean(w_up)


def clear_cache() -> None:
    _cache.clear()
