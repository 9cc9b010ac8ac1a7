"""Benchmarks: registered tasks that build requests, parse responses and score them."""

from mmprune_exp.benchmarks import shapes  # noqa: F401  (registers shapes_vqa, shapes_grounding)
from mmprune_exp.benchmarks.base import BENCHMARKS, Benchmark, Record, build_benchmark, register_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "Record", "build_benchmark", "register_benchmark"]
