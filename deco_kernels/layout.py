"""Derived weight layouts the kernels read, computed once per weight version and cached.

Every backend reads the canonical weights in place (w_up's expert slabs are contiguous rows; w_down's expert
blocks are 2*de-byte row segments); the only derived tensor is wbar, the fp32 mean of w_up's rows, which turns
the global NormSiLU mean into one dot product per token. The cache is keyed by the tensor's storage and its
version counter, so an optimizer step or a load_state_dict (both bump the version or change the storage)
refreshes it, and a module and a functional caller share it.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

_CACHE_SIZE = 64
_cache: "OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]]" = OrderedDict()


def _key(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def expert_mean(w_up: torch.Tensor) -> torch.Tensor:
    """wbar = mean of the rows of w_up, fp32 [d]; cached per (tensor, storage, version) of w_up."""
    key = _key(w_up)
    hit = _cache.get(key)
    # The weak reference guards against a new tensor reusing a dead one's id and memory.
    if hit is not None and hit[0]() is w_up:
        wbar = hit[1]
    else:
        wbar = None
    if wbar is None:
        with torch.no_grad():
            wbar = w_up.detach().float().mean(dim=0)
        _cache[key] = (weakref.ref(w_up), wbar)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return wbar


def clear_cache() -> None:
    _cache.clear()
