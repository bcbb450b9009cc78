"""Library attention kernels for prompts: cuDNN flash attention (GPU) and Pallas splash attention (TPU).

    out = prompt_attention(q, k, v, valid=valid, scale=scale, impl="splash")

Both serve self-attention over one prompt whose tokens are in position order,
which every prefill and training forward is (a pruned prompt keeps its
survivors in order): there, "key j is visible to query i" (k_pos[j] <= q_pos[i]
and k_valid[j]) is the causal mask by index restricted to valid tokens, which
these kernels express without a (t, s) mask tensor:

  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` supports a
    causal mask with per-row sequence lengths (right padding) but not holes.
    The valid tokens of each row are moved to its front (a stable partition,
    so their order and hence causality is kept), attended with lengths, and
    moved back. `implementation="xla"` runs the same path on any backend (the
    tests' check of its masking).
  * "splash": `jax.experimental.pallas.ops.tpu.splash_attention`, one MQA
    kernel per key/value head group, padding as segment 0 (valid tokens are
    segment 1, so they never see padding), the sequence padded to whole
    blocks. Off TPU it runs in Pallas interpret mode (correct, slow: tests).

Decoding against a cache needs the position mask and stays on the XLA paths
(hybridvlm/ops/attention.py). Rows of padding give 0, as the blockwise path
does, with zero gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental.pallas.ops.tpu import splash_attention as splash

__all__ = ["PROMPT_KERNELS", "prompt_attention"]

PROMPT_KERNELS = ("cudnn", "splash")
# Splash blocks: TPU tiles are multiples of 128 lanes; 512 is the kernel's usual size.
_SPLASH_ALIGN = 128
_SPLASH_BLOCK = 512


def _zero_padding_rows(out, valid):
    return jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))


def attention_cudnn(q, k, v, *, valid, scale, implementation: str | None = "cudnn"):
    """cuDNN flash attention over a prompt in position order.

    Args:
      q: (b, t, n, d); k, v: (b, t, kv, d) with kv dividing n; valid: (b, t) bool.
      implementation: "cudnn" (GPU, bfloat16 / float16) or "xla" (any backend).
    Returns:
      (b, t, n, d) in q's dtype; 0 on rows of padding.
    """
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl 'cudnn': cuDNN flash attention takes bfloat16 or float16, got {q.dtype} "
                         "(set the compute dtype, or use attention_impl 'auto')")
    # Valid tokens first, in order; `back` undoes the permutation.
    front = jnp.argsort(~valid, axis=1, stable=True)
    back = jnp.argsort(front, axis=1)
    take = lambda a, order: jnp.take_along_axis(a, order[:, :, None, None], axis=1)
    lengths = valid.sum(axis=1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(take(q, front), take(k, front), take(v, front), scale=scale, is_causal=True,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return _zero_padding_rows(take(out, back), valid).astype(q.dtype)


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """The causal MQA splash kernel for `heads` query heads sharing one key/value head.

    Built per trace: the kernel holds its mask tables as arrays of the trace that made it.
    """
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_block(length: int) -> tuple[int, int]:
    """(padded length, block) for a prompt of `length` tokens: whole blocks of at most 512."""
    aligned = -(-length // _SPLASH_ALIGN) * _SPLASH_ALIGN
    block = min(_SPLASH_BLOCK, aligned)
    return -(-aligned // block) * block, block


def attention_splash(q, k, v, *, valid, scale, interpret: bool | None = None):
    """Pallas splash attention over a prompt in position order (shapes as `attention_cudnn`).

    interpret: None = interpret mode unless the backend is TPU.
    """
    b, t, n, _ = q.shape
    kv = k.shape[2]
    if n % kv:
        raise ValueError(f"attention: {kv} kv heads must divide {n} query heads")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    length, block = splash_block(t)
    pad = ((0, 0), (0, length - t), (0, 0), (0, 0))
    # The kernel does not scale its logits.
    qg = rearrange(jnp.pad(q * jnp.asarray(scale, q.dtype), pad), "b t (k r) d -> b k r t d", k=kv)
    kg = rearrange(jnp.pad(k, pad), "b s k d -> b k s d")
    vg = rearrange(jnp.pad(v, pad), "b s k d -> b k s d")
    segments = jnp.pad(valid, ((0, 0), (0, length - t))).astype(jnp.int32)
    kernel = _splash_kernel(n // kv, length, block, interpret)

    def one_group(qh, kh, vh, seg):
        return kernel(qh, kh, vh, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    per_group = jax.vmap(one_group, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_group)(qg, kg, vg, segments)
    out = rearrange(out, "b k r t d -> b t (k r) d")[:, :t]
    return _zero_padding_rows(out, valid).astype(q.dtype)


def prompt_attention(q, k, v, *, valid, scale, impl: str):
    """Self-attention of a prompt in position order with the library kernel `impl` (PROMPT_KERNELS)."""
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention_impl 'cudnn' needs a GPU; the backend is {jax.default_backend()}")
        return attention_cudnn(q, k, v, valid=valid, scale=scale)
    if impl == "splash":
        return attention_splash(q, k, v, valid=valid, scale=scale)
    raise ValueError(f"attention_impl: {impl!r} is not a prompt kernel {PROMPT_KERNELS}")
