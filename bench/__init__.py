"""Benchmarks: GPU and live runs that print JSON results (bench/results/). Run as `python -m bench.NAME`.

Not for: correctness (tests/ are the oracle) or code the engine imports.
"""
