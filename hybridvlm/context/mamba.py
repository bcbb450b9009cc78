"""Mamba-2 across sequence shards: the conv halo and the SSM state carried between shards.

Inside `jax.shard_map` over a "sequence" axis of P shards, shard i holds the
contiguous tokens [i * t, (i + 1) * t) of every row. The recurrence

    S_l = exp(dt_l A) S_{l-1} + dt_l x_l B_l^T,    y_l = C_l S_l

is linear in the state, so a shard's outputs split into what its own tokens
give from a zero state (the ordinary chunked SSD, run locally) plus the
incoming state's contribution, read out by C and decayed to each position:

    y_l = y_l^local + exp(a_l) C_l S_in,    a_l = sum_{k <= l in the shard} dt_k A.

S_in of shard i follows from every earlier shard's (total log-decay, local
final state) pair: with the associative combine

    (a1, S1) o (a2, S2) = (a1 + a2, exp(a2) S1 + S2)

the inclusive scan over shards gives each shard's true final state, and S_in of
shard i is the scanned value of shard i - 1 (zero for shard 0). The pairs are
small ((b, h) and (b, h, p, n) per shard), so they are all-gathered and every
shard runs the P-long scan itself: bytes per layer per device are
P * b * h * (1 + p * n) * 4, independent of the sequence length.

The causal conv needs the k - 1 pre-conv inputs before the shard's first token:
the previous shard's last k - 1 (a `ppermute` one step along the ring; shard 0
gets zeros, as an unsharded prompt starts from a zero prefix).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


def conv_halo(u, taps: int, axis_name: str, axis_size: int):
    """The `taps - 1` inputs that precede this shard's block along the sequence.

    u: (b, t, *c) this shard's pre-conv inputs (t >= taps - 1). Returns
    (b, taps - 1, *c): the previous shard's last taps - 1 rows, zeros on shard 0.
    """
    width = taps - 1
    if u.shape[1] < width:
        raise ValueError(f"a sequence shard of {u.shape[1]} tokens is shorter than the conv's {width}-token halo; "
                         "use fewer sequence shards or a longer prompt")
    tail = u[:, u.shape[1] - width:]
    # ppermute leaves devices that receive nothing (shard 0) with zeros.
    return jax.lax.ppermute(tail, axis_name, perm=[(i, i + 1) for i in range(axis_size - 1)])


def _combine(left, right):
    """Associative combine of (log-decay, state) pairs, `left` earlier in the sequence."""
    a1, s1 = left
    a2, s2 = right
    return a1 + a2, jnp.exp(a2)[..., None, None] * s1 + s2


def incoming_state(total, local_final, axis_name: str):
    """This shard's incoming SSM state and its true final state.

    Args:
      total: (b, h) float32 summed log-decay (sum of dt * A) of this shard's tokens.
      local_final: (b, h, p, n) float32 final state of this shard from a zero start.
    Returns:
      S_in (b, h, p, n): the state entering this shard (zeros on shard 0), and
      S_out (b, h, p, n): the state after it, exp(total) S_in + local_final.
    """
    totals = jax.lax.all_gather(total, axis_name)  # (P, b, h)
    finals = jax.lax.all_gather(local_final, axis_name)  # (P, b, h, p, n)
    _, scanned = jax.lax.associative_scan(_combine, (totals, finals), axis=0)  # inclusive
    me = jax.lax.axis_index(axis_name)
    previous = jax.lax.dynamic_index_in_dim(scanned, jnp.maximum(me - 1, 0), axis=0, keepdims=False)
    s_in = jnp.where(me > 0, previous, jnp.zeros_like(previous))
    s_out = jax.lax.dynamic_index_in_dim(scanned, me, axis=0, keepdims=False)
    return s_in, s_out


def state_readout(C, dt, A, s_in):
    """The incoming state's contribution to this shard's SSD outputs.

    Args:
      C: (b, t, g, n); dt: (b, t, h) float32 steps; A: (h,) float32 negative;
      s_in: (b, h, p, n) float32, heads [g * r, (g + 1) * r) reading group g.
    Returns:
      (b, t, h, p) float32: exp(a_l) C_l . S_in per head, a_l = cumsum(dt A) over the shard.
    """
    g = C.shape[2]
    decay = jnp.exp(jnp.cumsum(dt * A, axis=1))  # (b, t, h)
    s = rearrange(s_in, "b (g r) p n -> b g r p n", g=g)
    read = jnp.einsum("btgn,bgrpn->btgrp", C.astype(jnp.float32), s)
    return rearrange(read, "b t g r p -> b t (g r) p") * decay[..., None]


def sharded_ssd_tail(y_local, local_final, C, dt, A, axis_name: str):
    """Completes a shard's zero-start SSD with the state the earlier shards hand it.

    Args:
      y_local: (b, t, h, p) float32 and local_final (b, h, p, n) float32: the SSD of
        this shard's tokens from a zero state (any `hybridvlm.ssd` implementation).
      C, dt, A: as `state_readout`.
    Returns:
      y (b, t, h, p) float32, equal to the SSD of the whole sequence at this shard's
      positions, and this shard's true final state (b, h, p, n) (the last shard's is
      the sequence's).
    """
    total = jnp.sum(dt * A, axis=1)  # (b, h)
    s_in, s_out = incoming_state(total, local_final.astype(jnp.float32), axis_name)
    return y_local + state_readout(C, dt, A, s_in), s_out
