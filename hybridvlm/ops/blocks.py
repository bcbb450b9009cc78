"""Sequence blocks: run a function over consecutive blocks of a long sequence.

A long prefill (32k tokens at the 12B width) is dominated by temporaries
proportional to the sequence: the MLP's (t, 4d) hidden layer, the Mamba
in_proj output, the chunked SSD's per-chunk kernels. `map_blocks` runs a
function block after block in a loop (optionally carrying a recurrent
state), so those temporaries are one block's worth.

How it is written matters to XLA's memory use:
  * Every block runs inside the loop (the sequence is zero-padded to whole
    blocks; blocks are balanced, so the padding is small). Work outside a
    loop that depends only on weights (the CPU compiler's float32 copies of
    bfloat16 weights) may be scheduled at the start of the program, keeping
    every layer's copy alive at once; inside a loop body it cannot be.
  * The output is written block by block into a buffer that starts as a copy
    of the input, not stacked as a loop output: a stacked output starts as a
    zero broadcast that depends on nothing, which the scheduler may likewise
    hoist for every layer.

Gradients flow through the loop; reverse mode stores each block's residuals,
and on CPU a backward over several blocks ran ~25% slower than over one (the
chunked SSD at 4k tokens, 2 groups vs 1), so the defaults keep short
sequences in one block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_plan(length: int, block: int | None, align: int = 1) -> tuple[int, int]:
    """(number of blocks, block length) that `map_blocks` uses for `length` positions.

    At most ~`block` positions per block (rounded up to a multiple of
    `align`), balanced so that the padding of the last block is small.
    block None or 0, or length <= block: one block of the whole length.
    """
    if not block or length <= block:
        return 1, length
    n = -(-length // block)
    size = -(-length // n)
    size = -(-size // align) * align
    n = -(-length // size)
    return (n, size) if n > 1 else (1, length)


def map_blocks(fn, x, *extras, block: int | None, align: int = 1, carry=None, axis: int = 1):
    """Applies fn to consecutive blocks of x along `axis`, in order.

    Args:
      fn: (carry, x_block, *extra_blocks) -> (carry, y_block), where y_block
        has x_block's shape (any dtype). It must treat positions independently
        except through `carry` (a state passed from block to block). The last
        block is zero-padded at its end (extras too: False for bool arrays):
        a recurrent fn must keep padded positions out of its carry (e.g. with
        an extra that is True on real positions).
      x: array with the sequence on `axis`.
      extras: arrays, or pytrees of them (e.g. a `Layout`), with the same
        sequence axis and length, sliced alongside x.
      block: static target block length (see `block_plan`); None, 0 or
        >= the length: one call of fn on everything, no loop.
      align: block lengths are multiples of this (e.g. the SSD chunk size).
      carry: initial carry (any pytree, or None).
    Returns:
      (y, carry): y has x's shape and y_block's dtype; the final carry.
    """
    t = x.shape[axis]
    n, size = block_plan(t, block, align)
    if n == 1:
        carry, y = fn(carry, x, *extras)
        return y, carry
    pad = lambda a: jnp.pad(a, [(0, n * size - t) if d == axis else (0, 0) for d in range(a.ndim)])
    x_pad, extras = pad(x), jax.tree.map(pad, extras)
    sl = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, size, axis)
    blocks_of = lambda tree, start: jax.tree.map(lambda a: sl(a, start), tree)
    out = jax.eval_shape(lambda c, *a: fn(c, *blocks_of(a, 0))[1], carry, x_pad, *extras)
    want = x.shape[:axis] + (size,) + x.shape[axis + 1:]
    if tuple(out.shape) != want:
        raise ValueError(f"map_blocks: fn must keep the block's shape {want}, it returned {tuple(out.shape)}")
    # The output buffer starts as a copy of the input: data, so it cannot be
    # hoisted (a zero buffer could). Blocks are read from the unchanged input:
    # reading and updating one buffer would make XLA copy it at every step.
    out_buf = x_pad.astype(out.dtype)

    def step(i, state):
        out_buf, carry = state
        start = i * size
        carry, yb = fn(carry, sl(x_pad, start), *blocks_of(extras, start))
        return jax.lax.dynamic_update_slice_in_dim(out_buf, yb.astype(out.dtype), start, axis), carry

    out_buf, carry = jax.lax.fori_loop(0, n, step, (out_buf, carry))
    return jax.lax.slice_in_dim(out_buf, 0, t, axis=axis), carry
