"""Cluster launch tooling: `python -m launch.submit` (see launch/README.md)."""
