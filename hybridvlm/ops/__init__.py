"""Functional building blocks (no parameters): attention kernels."""
