"""Measured performance: `make bench` (python -m bench.run). Not tests."""
