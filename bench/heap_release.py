"""How much of the freed activation memory leaves the resident set, with and without ``bound_heap``.

Allocates 64 blocks of 2 MB (the size class of per-sample activations of a small layer), frees them and
reads ``VmRSS`` from ``/proc/self/status`` (above the start) while held, after the free, and after
``release_freed_memory``. Each mode
runs in its own process (glibc's malloc state is per process). Linux/glibc only; the numbers depend on the
machine and the allocator, which is why they are measured here on demand and not asserted in the tests
(``tests/pruners/test_offload.py`` checks glibc's mmap bookkeeping instead).

Run: ``python bench/heap_release.py [--blocks 64] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def worker(bounded: bool, blocks: int, rounds: int) -> dict:
    import torch

    from mmprune_exp.utils import bound_heap, release_freed_memory

    applied = bound_heap() if bounded else False
    release_freed_memory()
    before = rss_kb()
    held, freed, trimmed = [], [], []
    for _ in range(rounds):  # several rounds: glibc's dynamic threshold moves after the first frees
        data = [torch.ones(1 << 19) for _ in range(blocks)]
        held.append(rss_kb() - before)
        del data
        freed.append(rss_kb() - before)
        release_freed_memory()
        trimmed.append(rss_kb() - before)
    return {"bound_heap": bounded, "applied": applied, "held_kb": held, "freed_kb": freed, "trimmed_kb": trimmed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["bounded", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "bounded", args.blocks, args.rounds)))
        return
    for mode in ("default", "bounded"):
        cmd = [sys.executable, __file__, "--worker", mode, "--blocks", str(args.blocks), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:<8} applied={row['applied']!s:<5} held kB {row['held_kb']}  after free {row['freed_kb']}  "
              f"after trim {row['trimmed_kb']}")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
