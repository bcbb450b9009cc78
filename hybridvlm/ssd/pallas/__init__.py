"""Pallas SSD kernels (TPU / GPU; interpret mode on CPU).

api.py: `ssd_pallas`, the entry point (`jax.custom_vjp`); forward.py and
backward.py: the kernels; layout.py: tiling, padding and matmul precision.
"""

from hybridvlm.ssd.pallas.api import BACKWARDS, GPU_PLAN, PRECISIONS, TPU_PLAN, TilePlan, plan_for_backend, ssd_pallas

__all__ = ["ssd_pallas", "TilePlan", "TPU_PLAN", "GPU_PLAN", "plan_for_backend", "BACKWARDS", "PRECISIONS"]
