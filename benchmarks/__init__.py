"""Benchmarks: each script reproduces a published figure and writes it to results/."""
