"""Runnable benchmarks for gradbalance (``python -m benchmarks --help``); never imported by the package."""
