"""Benchmarks against peers, run side by side in one process tree; they print tables, never pass/fail."""
