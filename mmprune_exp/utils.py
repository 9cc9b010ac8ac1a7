"""Small run helpers: seeding, stage timing, peak memory, stable hashing."""

from __future__ import annotations

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


def stable_hash(obj: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
