"""The GPU benchmarks, run from the repository root as modules: `PYTHONPATH=src python -m benchmarks.bench_lif`."""
