"""Benchmarks: registered tasks that build requests, parse responses and score them."""

from mmprune_exp.benchmarks import mathv, ovdeval, shapes  # noqa: F401  (register their benchmarks)
from mmprune_exp.benchmarks.base import BENCHMARKS, Benchmark, Record, build_benchmark, register_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "Record", "build_benchmark", "register_benchmark"]
