"""wsync sync benchmarks (see docs/BENCHMARKS.md). Entry point: `python bench/sync_bench.py`."""
