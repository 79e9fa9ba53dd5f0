"""Resolve a MODEL argument and load it: checkpoint reading, family facts, the loader."""
