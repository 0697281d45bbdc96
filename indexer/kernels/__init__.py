"""Projection kernels: vector top-k (vectors.py) and exact factored top-N (pairs.py)."""
