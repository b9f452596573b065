"""Benchmarks of gpu-tasks: routing cost, publish rate, worker drain rate (see README.md)."""
