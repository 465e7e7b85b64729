"""Benchmarks of the fused HRM loss: providers, a runner (python -m benchmarks.run), a report."""
