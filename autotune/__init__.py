"""deco_kernels.autotune: per-device tile configs for the kernels (the harness arrives with the autotune issue).

Installed as ``deco_kernels.autotune`` (the folder is autotune/ at the top of the repository)."""
