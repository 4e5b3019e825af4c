"""The machine record stored with every `bench.json`: what the figures were measured on.

Benchmark figures are only comparable on the same machine, so the record names
the CPU and the instruction-set flags that decide which kernels oneDNN picks
(AVX-512, its bf16 dot products, AMX tiles), the cores and threads, the
PyTorch build, the allocator setting, and a GEMM peak in fp32 and bf16 from a
short matmul loop: the ceiling the convolutions (95% of a CapsNet step's
FLOPs) are measured against.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import torch

FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")


def cpu_info() -> dict:
    """CPU model, the flags of FLAGS present or not, logical CPUs and physical cores (from /proc/cpuinfo)."""
    name, flags, cores = platform.processor() or platform.machine(), set(), set()
    with contextlib.suppress(OSError):
        phys = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name":
                name = value
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "physical id":
                phys = value
            elif key == "core id":
                cores.add((phys, value))
    return {"cpu": name, "flags": {f: f in flags for f in FLAGS}, "cpus": os.cpu_count(),
            "physical_cores": len(cores) or None}


def gemm_gflops(dtype: torch.dtype, device: torch.device, n: int, seconds: float) -> float | None:
    """Best single n x n x n matmul rate (GFLOP/s) over a loop of about `seconds`; None if unsupported."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b  # warm-up: kernel selection, first-touch of the output
        sync()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds or best == float("inf"):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
    except RuntimeError:
        return None
    return 2 * n ** 3 / best / 1e9


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat), before anything of ours runs: the
    one-minute load average lags by a minute and would count the previous command's work."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return None if total1 <= total0 else 1.0 - (idle1 - idle0) / (total1 - total0)


def machine_record(device: torch.device, allocator: str, gemm_seconds: float = 0.5) -> dict:
    """Everything the figures depend on besides the code: CPU, GPU, threads, torch, allocator, GEMM peaks."""
    n = 8192 if device.type == "cuda" else 1024
    rec = {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "allocator": allocator,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "gemm_n": n}
    for key, dtype in (("gemm_gflops_fp32", torch.float32), ("gemm_gflops_bf16", torch.bfloat16)):
        rec[key] = gemm_gflops(dtype, device, n, gemm_seconds) if gemm_seconds > 0 else None
    return rec


def describe(rec: dict) -> str:
    """One line naming the machine, for the console and the docs."""
    flags = ", ".join(f for f, on in rec.get("flags", {}).items() if on) or "none of " + "/".join(FLAGS)
    gemm = lambda k: "-" if rec.get(k) is None else f"{rec[k]:.0f}"  # noqa: E731
    where = f"{rec.get('cpu')} ({rec.get('cpus')} CPUs)"
    where = f"{rec['gpu']} on {where}" if rec.get("gpu") else where
    return (f"{where}, flags: {flags}; torch {rec.get('torch')}, {rec.get('threads')} threads, "
            f"allocator {rec.get('allocator')}; GEMM peak {gemm('gemm_gflops_fp32')} GFLOP/s fp32, "
            f"{gemm('gemm_gflops_bf16')} bf16")
