"""Experts: their weights, the stores that hold them, and the module that computes them."""
