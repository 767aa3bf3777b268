"""Benchmarks of refdiff: per-stage time and memory, and machine-independent ratios (see README.md)."""
