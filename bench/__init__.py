"""Benchmarks: `python -m bench.<name>`; each prints its numbers, none is a test."""
