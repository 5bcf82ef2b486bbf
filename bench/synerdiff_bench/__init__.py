"""Benchmark harness: SD1.5-shaped test models, offline profiler, open-loop load, baselines, reports.

Run `python -m synerdiff_bench --help`. Benchmarks are measured on the GPU machine; the CPU
tests only check that the harness works end to end on the embedded tiny model.
"""
