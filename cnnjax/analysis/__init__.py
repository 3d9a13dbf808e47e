"""cnnjax.analysis."""
