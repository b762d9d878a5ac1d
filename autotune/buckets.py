"""Shape buckets: the cache key of a call is (path, layer geometry, token-count bucket), never a raw token count.

Bucket edges follow the kernels' own regimes: T <= 2 multiplies in registers (ffn.FMA_MAX_T), T <= 64 is the
small-batch union path (ffn.SMALL_BATCH_MAX), larger T groups tokens by expert. A bucket is tuned at its
representative T (its upper end, or 4096 for the open-ended last one): the largest T of a bucket has the most
active experts and the largest tiles, so its config is the safe one for the rest of the bucket.
"""
from __future__ import annotations

# (label, lowest T, highest T, T the tuner measures)
BUCKETS = (
    ("t1", 1, 1, 1),
    ("t2", 2, 2, 2),
    ("t3-4", 3, 4, 4),
    ("t5-8", 5, 8, 8),
    ("t9-16", 9, 16, 16),
    ("t17-64", 17, 64, 64),
    ("t65-512", 65, 512, 512),
    ("t513-2048", 513, 2048, 2048),
    ("t2049+", 2049, None, 4096),
)
LABELS = [b[0] for b in BUCKETS]
_DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
                "bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
                "fp32": "fp32"}


def bucket_of(T: int) -> str:
    """Label of the bucket holding T (T >= 1)."""
    if T < 1:
        raise ValueError(f"T: expected a token count >= 1, got {T}")
    for label, lo, hi, _ in BUCKETS:
        if hi is None or T <= hi:
            return label
    raise AssertionError("unreachable: the last bucket is open-ended")


def representative_t(label: str) -> int:
    for name, _, _, rep in BUCKETS:
        if name == label:
            return rep
    raise ValueError(f"unknown bucket {label!r}; known: {LABELS}")


def path_of(T: int) -> str:
    """The kernel path ffn.deco_ffn takes for T tokens (kept in step with ffn.SMALL_BATCH_MAX)."""
    return "small_batch" if T <= 64 else "grouped"


def buckets_of_path(path: str) -> list[str]:
    return [label for label, _, _, rep in BUCKETS if path_of(rep) == path]


def dtype_name(dtype) -> str:
    name = _DTYPE_NAMES.get(str(dtype))
    if name is None:
        raise ValueError(f"dtype: expected bfloat16, float16 or float32, got {dtype}")
    return name


def shape_key(d: int, n: int, de: int, ds: int, dtype) -> str:
    return f"d{int(d)}_n{int(n)}_de{int(de)}_ds{int(ds)}_{dtype_name(dtype)}"


def entry_key(path: str, d: int, n: int, de: int, ds: int, dtype, T: int) -> str:
    """"<path>/<geometry>/<bucket>", e.g. "small_batch/d768_n42_de64_ds128_bf16/t1"."""
    return f"{path}/{shape_key(d, n, de, ds, dtype)}/{bucket_of(T)}"


def is_current(key: str) -> bool:
    """Whether an entry key (entry_key's form) names a bucket of BUCKETS: entries of retired buckets are never
    looked up again."""
    return key.rsplit("/", 1)[-1] in LABELS
