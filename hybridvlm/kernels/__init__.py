"""Pallas kernels (TPU / GPU; interpret mode on CPU)."""
