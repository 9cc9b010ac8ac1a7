"""Small run helpers: seeding, stage timing, peak memory, heap release, stable hashing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import random
import resource
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StageTimer:
    """Wall seconds per named stage: ``with timer("prune"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB.

    Linux's VmHWM belongs to the address space, so it starts afresh at exec; ``ru_maxrss`` survives exec and
    would report the parent's footprint for a process forked from a large one (a benchmark driver, say).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (GB) and, on CUDA, peak allocated device memory (GB)."""
    out = {"peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available():
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where malloc is not glibc's (looked up once: find_library may run ldconfig)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_heap(mmap_threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of at least ``mmap_threshold_bytes`` with its own mmap (glibc only).

    glibc raises its mmap threshold as large blocks are freed, after which the per-sample activations of a
    decoder layer (megabytes each) come from the heap, whose free space is rarely handed back: the resident
    set then creeps up layer after layer. With a fixed threshold such blocks go back to the OS when freed,
    so a streamed model's footprint stays at one layer's worth however deep it is. Returns whether it applied.
    """
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_bytes)))


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def stable_hash(obj: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
