"""Benchmarks: GPU and live runs that print JSON results (bench/results/). Run as `python -m bench.NAME`."""
