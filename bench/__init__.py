"""Benchmarks: one command each, printing their figures and the machine they ran on (docs/benchmarks.md)."""
