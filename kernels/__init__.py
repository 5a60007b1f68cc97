"""Triton kernels with torch references; installed as raylm.kernels."""
