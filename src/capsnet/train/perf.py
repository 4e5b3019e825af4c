"""Process-wide speed settings that `train.py` and the benchmark apply (see docs/performance.md).

`keep_freed_memory`: glibc returns large freed blocks to the OS (each one an
mmap of its own), so every step page-faults its big buffers in again; on a
2-core CPU that costs several per cent of a CapsNet step. Turning off mmap for
allocations and raising the trim threshold makes freed memory reusable at
once. Overridable: `trainer.allocator=default`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; False where that is not possible (not glibc)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (between benchmark cases)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def configure_allocator(name: str) -> None:
    if name == "keep":
        keep_freed_memory()
