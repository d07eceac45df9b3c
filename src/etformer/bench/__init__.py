"""Benchmarks: timing with CUDA events, measured peaks and floors, peers side by side, reports."""
