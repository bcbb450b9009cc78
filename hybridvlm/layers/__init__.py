"""Flax NNX layers of the hybrid LM: norms, MLP, attention, Mamba-2 mixer."""
