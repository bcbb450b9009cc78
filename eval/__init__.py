"""`jax.jit` evaluation scripts, benchmarks and the demo (`python -m eval.<name>`)."""
