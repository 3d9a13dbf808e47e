"""Small helpers shared across cnnjax (argument validation)."""
