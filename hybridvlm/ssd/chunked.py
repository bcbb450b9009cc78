"""Chunked Mamba-2 SSD (state-space duality) in plain XLA.

The sequence is cut into chunks of `chunk_size`. Within a chunk the output is
a masked matmul with the implicit attention matrix
    M[i, j] = (C_i . B_j) exp(sum_{k=j+1..i} dt_k A) dt_j,    j <= i;
between chunks only the (head_dim x d_state) states travel, through the
linear recurrence S_c = exp(sum_chunk dt A) S_{c-1} + U_c, run here with
`lax.scan` (memory linear in the number of chunks).

Chunks are processed in groups of `chunk_group` chunks, one group after the
other, carrying the state: the decay kernels and C.B products of a group are
its temporaries, so memory no longer grows with the length (one group: the
same computation as without groups). The state carried between groups is
the one carried between chunks, so grouping does not change the math.

Lengths that are not a multiple of `chunk_size` are padded with dt = 0 and
x = 0: such steps neither decay nor feed the state, so the final state is
exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from hybridvlm.config import SSD_CHUNK_GROUP
from hybridvlm.ops.blocks import map_blocks


def ssd_chunked(x, dt, A, B, C, *, chunk_size, initial_state=None, chunk_group=SSD_CHUNK_GROUP):
    """Chunked SSD forward.

    Args:
      x: (b, l, h, p) inputs; dt: (b, l, h) positive steps; A: (h,) negative.
      B, C: (b, l, g, n) with g dividing h (heads [g*r, (g+1)*r) share group g).
      chunk_size: static chunk length.
      initial_state: (b, h, p, n) or None for zeros.
      chunk_group: static chunks per group (None or 0: all in one group).
    Returns:
      y (b, l, h, p) float32 (no D skip) and final state (b, h, p, n) float32.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    group = chunk_group * chunk_size if chunk_group else None
    if group is None or l <= group:
        return _ssd_group(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state)
    s0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def one_group(state, xg, dtg, Bg, Cg):
        y, state = _ssd_group(xg, dtg, A, Bg, Cg, chunk_size=chunk_size, initial_state=state)
        return state, y

    # Zero padding of the last group is exact (dt = 0: no decay, no input).
    return map_blocks(one_group, x, dt, B, C, block=group, align=chunk_size, carry=s0)


def _ssd_group(x, dt, A, B, C, *, chunk_size, initial_state):
    """`ssd_chunked` over all of x's chunks at once (same arguments and result)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    pad = (-l) % chunk_size
    f32 = jnp.float32
    x, dt, B, C = (v.astype(f32) for v in (x, dt, B, C))
    if pad:
        padder = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        x, dt, B, C = map(padder, (x, dt, B, C))

    # Layout (b, c, g, r, s, ...): batch dims first, so every contraction
    # below is one batched matmul; elementwise products are written as such
    # (an einsum with no contracted dim becomes a slow batched dot on CPU).
    # c: chunk, s/i/j: position in chunk, g: group, r: head in group.
    xc = rearrange(x, "b (c s) (g r) p -> b c g r s p", s=chunk_size, g=g)
    dtc = rearrange(dt, "b (c s) (g r) -> b c g r s", s=chunk_size, g=g)
    Bc = rearrange(B, "b (c s) g n -> b c g s n", s=chunk_size)
    Cc = rearrange(C, "b (c s) g n -> b c g s n", s=chunk_size)
    Ag = rearrange(A.astype(f32), "(g r) -> g r", g=g)

    a_cum = jnp.cumsum(dtc * Ag[:, :, None], axis=-1)  # (b, c, g, r, s) log-decay
    a_total = a_cum[..., -1]  # (b, c, g, r)

    # 1. Intra-chunk: masked matmul with the decayed C.B kernel.
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    seg = a_cum[..., :, None] - a_cum[..., None, :]  # (b, c, g, r, i, j)
    kernel = jnp.exp(jnp.where(causal, seg, -jnp.inf)) * dtc[..., None, :]
    cb = jnp.einsum("bcgin,bcgjn->bcgij", Cc, Bc)
    y_diag = jnp.einsum("bcgrij,bcgrjp->bcgrip", kernel * cb[:, :, :, None], xc)

    # 2. Each chunk's own contribution to the state at its end.
    to_end = jnp.exp(a_total[..., None] - a_cum) * dtc  # (b, c, g, r, s)
    chunk_states = jnp.einsum("bcgrsp,bcgsn->bcgrpn", xc * to_end[..., None], Bc)

    # 3. Inter-chunk recurrence S_c = exp(a_total_c) S_{c-1} + U_c.
    if initial_state is None:
        s0 = jnp.zeros((b, g, h // g, p, n), f32)
    else:
        s0 = rearrange(initial_state.astype(f32), "b (g r) p n -> b g r p n", g=g)

    def carry_state(s_prev, inputs):
        total, u = inputs
        return jnp.exp(total)[..., None, None] * s_prev + u, s_prev

    final, starts = jax.lax.scan(
        carry_state, s0, (jnp.moveaxis(a_total, 1, 0), jnp.moveaxis(chunk_states, 1, 0))
    )
    starts = jnp.moveaxis(starts, 0, 1)  # (b, c, g, r, p, n): state entering chunk c

    # 4. Incoming state read out by C, decayed to each position.
    y_off = jnp.einsum("bcgsn,bcgrpn->bcgrsp", Cc, starts) * jnp.exp(a_cum)[..., None]

    y = rearrange(y_diag + y_off, "b c g r s p -> b (c s) (g r) p")[:, :l]
    return y, rearrange(final, "b g r p n -> b (g r) p n")
