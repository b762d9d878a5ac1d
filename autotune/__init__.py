"""deco_kernels.autotune: per-device tile configs for the Triton kernel paths.

- `config_for(path, device, T, dtype, d, n, de, ds)`: the tuned config for a call, or None (use the launcher's
  heuristic default); lookup order DECO_KERNELS_TUNE_DIR, the user cache dir, the shipped caches (lookup.py).
- `deco-kernels tune` (tune.py): measure on this GPU, or model a device profile (devices.py) such as Jetson
  Orin with the cost model (model.py) and compile-only checks (compile.py); `validate.py` compares the model's
  picks with measurements.

Installed as ``deco_kernels.autotune`` (the folder is autotune/ at the top of the repository). Importing it
imports neither Triton nor the kernels.
"""
from .buckets import BUCKETS, bucket_of, entry_key, shape_key
from .lookup import clear, config_for, search_dirs, user_cache_dir

__all__ = ["config_for", "bucket_of", "entry_key", "shape_key", "BUCKETS", "search_dirs", "user_cache_dir",
           "clear"]
