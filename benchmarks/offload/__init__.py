"""Helpers of ``benchmarks/bench_offload.py``: page cache control, machine facts, one measurement."""
