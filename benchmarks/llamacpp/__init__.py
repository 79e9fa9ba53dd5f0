"""Helpers of ``benchmarks/bench_llamacpp.py``: llama.cpp build, checkpoints, runners, report."""
