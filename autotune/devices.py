"""Device profiles for the cost model and the compile-only checks, and the fingerprint that keys tune caches.

A fingerprint is name + compute capability + SM count, e.g. "nvidia-h100-80gb-hbm3_sm90_132sm". Several Orin
modules report the same name ("Orin"), capability (8.7) and SM count (the Orin NX 16GB and the Orin Nano 8GB
both have 8 SMs), so a profile also carries its memory size, which breaks such ties (`lookup` picks the cache
whose memory is closest to the device's).

Sources (numbers are the module's maximum-performance mode):
- H100 SXM5 / H200 SXM: NVIDIA H100 Tensor Core GPU Architecture whitepaper (132 SMs, 228 KB smem per SM,
  227 KB per block, 50 MB L2, 3.35 TB/s HBM3, 989 dense bf16 TFLOP/s at 1.83 GHz); H200 product brief (same SM
  array, 141 GB HBM3e at 4.8 TB/s). SPEC §5: 1.3 µs per kernel launch in a CUDA graph, measured; the H100 tune
  (benchmarks/results/h100) measured 4.5 µs for a graph's first launch and 1.7 µs for each next one.
- Jetson AGX Orin 64GB: SPEC §5 and the NVIDIA Jetson AGX Orin Series Technical Brief v1.2 (2 GPCs, 16 SMs of
  128 CUDA cores and 4 third-generation tensor cores, 4 MB L2, 5.3 FP32 TFLOP/s at 1.3 GHz, 204.8 GB/s LPDDR5).
- Jetson AGX Orin 32GB: NVIDIA Jetson AGX Orin Series Data Sheet (1792 CUDA cores = 14 SMs, 56 tensor cores,
  930 MHz max, 204.8 GB/s).
- Jetson Orin NX 16GB: NVIDIA Jetson Orin NX Series Data Sheet DS-10712-001 (1024 CUDA cores = 8 SMs, 32 tensor
  cores, 918 MHz max, 128-bit LPDDR5 at 102.4 GB/s).
- Jetson Orin Nano 8GB: NVIDIA Jetson Orin Nano Series Data Sheet (1024 CUDA cores = 8 SMs, 32 tensor cores,
  625 MHz max, 68 GB/s; JetPack 6.1's "Super" mode raises these to 1020 MHz and 102 GB/s: measure with
  `deco-kernels tune` on the device to override the modelled cache).
Every Ampere/Hopper SM has 64K 32-bit registers and at most 255 per thread. Orin's SM is the GA10x-class
sm_87 SM (164 KB shared memory per SM, 163 KB per block; dense fp16/bf16 tensor rate 1024 FLOP per clock per
SM, consistent with the brief's INT8 TOPS); Hopper's is 4096 FLOP per clock per SM.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceProfile:
    key: str                    # short name used in CLI options and shipped cache file names
    name: str                   # the name torch.cuda.get_device_name reports
    capability: tuple[int, int]
    sms: int
    smem_per_block: int         # bytes a block may use (opt-in maximum)
    smem_per_sm: int            # bytes
    # Shared memory the CUDA driver reserves for every resident block on sm_80 and later
    # (cudaDevAttrReservedSharedMemoryPerBlock; why smem_per_block is 1 KB short of smem_per_sm).
    smem_reserved_per_block: int = 1024
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 48
    max_blocks_per_sm: int = 16
    l2_bytes: int = 0
    dram_gbps: float = 0.0      # GB/s, peak
    clock_ghz: float = 1.0
    tc_flops_per_clk_sm: int = 1024   # dense 16-bit tensor-core FLOP per clock per SM
    fma_flops_per_clk_sm: int = 256   # fp32 FMA FLOP per clock per SM (128 cores x 2)
    launch_us: float = 1.3      # per kernel launch inside a CUDA graph
    graph_start_us: float = 0.0 # extra cost of a graph's first launch (the rest cost launch_us each)
    mem_latency_us: float = 0.6 # one dependent global-memory round trip
    memory_gb: float = 0.0

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.name, self.capability, self.sms)

    @property
    def tc_tflops(self) -> float:
        return self.sms * self.tc_flops_per_clk_sm * self.clock_ghz * 1e-3

    def to_json(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}


_ORIN = dict(name="Orin", capability=(8, 7), smem_per_block=163 * 1024, smem_per_sm=164 * 1024,
             l2_bytes=4 << 20, max_warps_per_sm=48, tc_flops_per_clk_sm=1024, launch_us=2.5, mem_latency_us=0.8)

PROFILES: dict[str, DeviceProfile] = {p.key: p for p in (
    DeviceProfile(key="h100-sxm", name="NVIDIA H100 80GB HBM3", capability=(9, 0), sms=132,
                  smem_per_block=227 * 1024, smem_per_sm=228 * 1024, max_warps_per_sm=64, max_blocks_per_sm=32,
                  l2_bytes=50 << 20, dram_gbps=3350.0, clock_ghz=1.83, tc_flops_per_clk_sm=4096, memory_gb=80,
                  launch_us=1.7, graph_start_us=2.8),
    DeviceProfile(key="h200", name="NVIDIA H200", capability=(9, 0), sms=132,
                  smem_per_block=227 * 1024, smem_per_sm=228 * 1024, max_warps_per_sm=64, max_blocks_per_sm=32,
                  l2_bytes=50 << 20, dram_gbps=4800.0, clock_ghz=1.83, tc_flops_per_clk_sm=4096, memory_gb=141),
    DeviceProfile(key="orin-agx-64gb", sms=16, dram_gbps=204.8, clock_ghz=1.3, memory_gb=64, **_ORIN),
    DeviceProfile(key="orin-agx-32gb", sms=14, dram_gbps=204.8, clock_ghz=0.93, memory_gb=32, **_ORIN),
    DeviceProfile(key="orin-nx-16gb", sms=8, dram_gbps=102.4, clock_ghz=0.918, memory_gb=16, **_ORIN),
    DeviceProfile(key="orin-nano-8gb", sms=8, dram_gbps=68.0, clock_ghz=0.625, memory_gb=8, **_ORIN),
)}
ORIN_KEYS = [k for k in PROFILES if k.startswith("orin")]


def fingerprint_of(name: str, capability, sms: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{slug}_sm{capability[0]}{capability[1]}_{int(sms)}sm"


def describe_device(device=None) -> dict:
    """{"name", "capability", "sms", "memory_gb", "fingerprint"} of a CUDA device (torch.device, index or None)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    cap = (props.major, props.minor)
    return dict(name=props.name, capability=list(cap), sms=props.multi_processor_count,
                memory_gb=round(props.total_memory / 2**30, 1),
                fingerprint=fingerprint_of(props.name, cap, props.multi_processor_count))


def profile_of_environment(env: dict) -> DeviceProfile:
    """The profile of the GPU a benchmark result's "environment" names ("gpu", "capability" as "9.0", "sms",
    "memory_bytes")."""
    cap = tuple(int(v) for v in str(env["capability"]).split("."))
    return profile_for(dict(name=env["gpu"], capability=cap, sms=env["sms"],
                            memory_gb=env.get("memory_bytes", 0) / 2**30,
                            fingerprint=fingerprint_of(env["gpu"], cap, env["sms"])))


def profile_for(device_info: dict) -> DeviceProfile:
    """The profile matching a described device (fingerprint first, then closest memory); for an unknown GPU a
    profile built from its own properties and Hopper-like per-SM rates (good enough to rank candidates)."""
    matches = [p for p in PROFILES.values() if p.fingerprint == device_info["fingerprint"]]
    if matches:
        return min(matches, key=lambda p: abs(p.memory_gb - device_info.get("memory_gb", 0)))
    cap = tuple(device_info["capability"])
    return DeviceProfile(key=device_info["fingerprint"], name=device_info["name"], capability=cap,
                         sms=device_info["sms"], smem_per_block=227 * 1024 if cap >= (9, 0) else 99 * 1024,
                         smem_per_sm=228 * 1024 if cap >= (9, 0) else 100 * 1024, dram_gbps=2000.0,
                         clock_ghz=1.5, tc_flops_per_clk_sm=4096 if cap >= (9, 0) else 1024,
                         memory_gb=device_info.get("memory_gb", 0))
