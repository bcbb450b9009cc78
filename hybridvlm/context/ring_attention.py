"""Ring attention: masked grouped-query attention over a sequence split along a mesh axis.

Called inside `jax.shard_map` over a mesh axis of P devices along which a
prompt's tokens are split in contiguous equal blocks: shard i holds the
queries, keys and values of global positions [i * t, (i + 1) * t). Every
query needs the keys of every shard (at most those before it, under
causality), but no device ever holds more than two key/value blocks:

    blk = (k, v, k_pos, k_valid) of this shard
    fold blk into the online softmax of this shard's queries
    repeat P - 1 times:
      blk = ppermute(blk, i -> i + 1 mod P)     # one hop, on every device
      fold blk, unless no local query sees any of its keys

After hop j, device i holds the block of shard (i - j) mod P, so after P - 1
hops it has folded every shard's keys exactly once. The fold is the flash /
online softmax of `hybridvlm.ops.attention_blockwise`: per query row a running
max m, running sum l and float32 accumulator acc,

    m' = max(m, rowmax(S))          P = exp(S - m')  (masked entries 0)
    l' = l * exp(m - m') + rowsum(P)
    acc' = acc * exp(m - m') + P V

and the output is acc / l (0 on rows that saw no key at all). The mask is by
global positions (`visible`): key j is visible to query i iff k_valid[j] and
k_pos[j] <= q_pos[i], so pruned sequences (increasing positions with gaps)
work as well as contiguous ones.

Communication: each hop sends one key/value block with its positions and
mask to the next device, b * s * (2 * kv * d * itemsize + 4 + 1) bytes
(bfloat16, b = 1, s = 4096 local tokens, kv = 8, d = 128: 16 MiB per hop;
s rounded up to a multiple of block_k), P - 1 hops per call; the backward
(plain autodiff: ppermute's transpose is the reverse ppermute) sends the
same amount back for dk / dv. The fold of a block and the hop that sends it
on are independent, so XLA may overlap the transfer of the next block with
the compute on the current one.

Skipping: under causality the blocks of later shards are entirely invisible
to this shard's queries (shard i computes on i + 1 of the P blocks). Such a
fold is skipped with `lax.cond`; the hop still runs on every device (a
collective must be entered by all of them). The work is therefore unbalanced
across shards (the last does P folds, the first one); a striped or zigzag
token layout would balance it but is not what the callers provide.

Blocking: within one ring step the fold runs tile by tile, as in
`attention_blockwise`: this shard's t queries in blocks of block_q rows (a
`lax.map`, each block with its own m, l, acc) and, per query block, the
received s keys in blocks of block_k columns (an online-softmax `lax.scan`).
t and s are padded up to multiples with dummy query rows (position int32
min: they see nothing and are sliced off) and invalid keys; a length at most
its block size (or a block size of 0 / None) is one block, so small inputs
compile to the unblocked fold. A key block that no query of the query block
sees is skipped with `lax.cond` (under causality, the own block's blocks
above the diagonal), inside the whole-block skip above.

Memory: the forward's temporaries per ring step are O(block_q * block_k * n)
float32 scores / probabilities, plus the O(t * n * d) statistics and the
received O(s * kv * d) block; nothing of size t * s (32k local tokens x 32k
keys x 40 heads would be 160 GB of scores, at 512 x 512 tiles 40 MiB). The
backward (plain autodiff) is bounded by nested `jax.checkpoint`s, one per
loop level (see `ring_attention`): it saves per ring step only the step's
inputs (the received block and the statistics, as the output needs), and
recomputes a step's tiles one query block at a time, holding that block's
statistics after each key block, O((s / block_k) * block_q * n * d), and one
tile's probabilities, O(block_q * block_k * n). The received blocks are
still saved, i.e. the whole sequence's keys and values per device for the
backward; a custom VJP that sends them round the ring again would avoid
that. Scores are float32 (`preferred_element_type`); masked scores are the
finite -1e30, whose exp() underflows to exactly 0, so no inf - inf = NaN
appears, forward or backward, even on rows of padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from hybridvlm.ops.attention_blockwise import visible

__all__ = ["ring_attention"]

# Finite "minus infinity" for masked scores (see the module docstring).
_NEG = -1e30


def _block_size(block, length, name):
    """The tile size for `length` rows: `block`, or `length` when block is 0 / None or at least length."""
    if block is None or block == 0:
        return length
    if block < 0:
        raise ValueError(f"ring_attention: {name} must be positive (or 0 / None: one block), got {block}")
    return min(int(block), length)


def _blocks(x, size, fill):
    """(b, L, ...) -> (L' / size, b, size, ...), L padded up to a multiple L' of size with `fill`."""
    pad = (-x.shape[1]) % size
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(x.shape[0], -1, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def ring_attention(q, k, v, *, q_pos, k_pos, k_valid, scale, axis_name: str, axis_size: int,
                   block_q: int | None = 512, block_k: int | None = 512):
    """Attention of this shard's queries over the keys of all shards of `axis_name`.

    Call inside `jax.shard_map`; every device of the axis must call it (the
    key/value blocks hop around the ring with `ppermute`).

    Args:
      q: (b, t, n, d) local queries.
      k, v: (b, s, kv, d) local keys / values, kv dividing n (query head h
        reads kv head h // (n // kv), grouped-query). Differentiable.
      q_pos: (b, t) int32 and k_pos: (b, s) int32 GLOBAL positions.
      k_valid: (b, s) bool. Key j is visible to query i iff k_valid[j] and
        k_pos[j] <= q_pos[i] (`hybridvlm.ops.attention_blockwise.visible`).
      scale: Python float multiplying the scores.
      axis_name: the mesh axis the sequence is split along.
      axis_size: its size P (static).
      block_q, block_k: static tile sizes of a ring step's fold (queries,
        received keys); need not divide t, s; 0 or None: one block.
    Returns:
      (b, t, n, d) in q's dtype. Equals `attention_naive` on the gathered
      sequence on every row that sees a key; a row that sees none is 0.
    """
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if n % kv:
        raise ValueError(f"ring_attention: {kv} kv heads must divide {n} query heads")
    r = n // kv
    bq, bk = _block_size(block_q, t, "block_q"), _block_size(block_k, s, "block_k")
    nq, nk = -(-t // bq), -(-s // bk)
    q_pos, k_pos, k_valid = jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32), jnp.asarray(k_valid, bool)
    # The latest position among this shard's queries, per row: a block is
    # visible to some query of row b iff a valid key of it is at or before it.
    q_last = q_pos.max(axis=1)  # (b,)
    # Query blocks (nq, b, bq, kv, r, d) / (nq, b, bq); dummy rows sit at the
    # lowest position, so they see no key and their tiles are skipped.
    qs = _blocks(rearrange(q, "b t (k r) d -> b t k r d", k=kv), bq, 0)
    qps = _blocks(q_pos, bq, jnp.iinfo(jnp.int32).min)
    # The ring carries the keys already split into key blocks, (nk, b, bk, kv,
    # d) / (nk, b, bk), padded with invalid keys: no re-layout per step.
    own = (_blocks(k, bk, 0), _blocks(v, bk, 0), _blocks(k_pos, bk, 0), _blocks(k_valid, bk, False))

    def update(stats, kb, vb, kp, kvalid, qi, qpi):
        """Folds one tile: key block kb, vb (b, bk, kv, d), kp, kvalid (b, bk) into query block qi (b, bq, kv, r, d).

        stats: None (the block's first tile) or m, l (b, kv, r, bq) float32
        running max / sum and acc (b, kv, r, bq, d) float32. Returns the new
        (m, l, acc).
        """
        mask = visible(qpi, kp, kvalid)[:, None, None]  # (b, 1, 1, bq, bk)
        sc = jnp.einsum("btkrd,bskd->bkrts", qi, kb, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(mask, sc, _NEG)
        m_new = sc.max(-1) if stats is None else jnp.maximum(stats[0], sc.max(-1))
        # The output does not depend on the value of the running max (it
        # cancels between acc and l), so no gradient needs to flow through it.
        m_new = jax.lax.stop_gradient(m_new)
        # Masked entries are exactly 0 (not exp(_NEG - _NEG) = 1 on a row that
        # has seen nothing yet), so such rows keep l = 0 and acc = 0.
        p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
        pv = jnp.einsum("bkrts,bskd->bkrtd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        if stats is None:
            return m_new, p.sum(-1), pv
        m, l, acc = stats
        corr = jnp.exp(m - m_new)  # rescales what was accumulated under the old max
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    def tile(stats, kblock, qi, qpi):
        """`update`, skipped (identity) when no query of the query block sees any key of the key block."""
        kp, kvalid = kblock[2], kblock[3]
        # Exact, and O(b * (bq + bk)) rather than the (b, bq, bk) mask.
        seen_any = jnp.any(kvalid & (kp <= qpi.max(axis=1)[:, None]))
        return jax.lax.cond(seen_any, lambda st: update(st, *kblock, qi, qpi), lambda st: st, stats)

    # Checkpoints, one per loop level that exists (small inputs: one level):
    # - the ring step (below): the backward saves the step's inputs only;
    # - a query block's fold of one step, if nq > 1: recomputing a step then
    #   saves each query block's inputs (its statistics) and not the
    #   probabilities of all its tiles;
    # - a tile, if nk > 1: recomputing a query block's fold then saves the
    #   running statistics after each key block, O(nk * bq * n * d), instead
    #   of the block's bq * s * n probabilities (a factor block_k / d more);
    #   each tile's probabilities are recomputed one tile at a time.
    # Checkpointing only the tiles (without the query-block level) would save
    # those statistics for all nq * nk tiles of a step, O(t * s / bk * n * d);
    # only the query-block level, a whole block's probabilities. Both cost one
    # extra forward of the tiles in the backward; memory, not flops, is what
    # context parallelism is for.
    tile_ck = jax.checkpoint(tile) if nk > 1 else tile

    def fold_query_block(stats, block, qi, qpi):
        """Folds the nk key blocks of `block` into one query block; stats None: from its first tile on."""
        if stats is None:
            # The own block's first tile is folded unconditionally: the
            # statistics then start as data (see below).
            stats = update(None, *jax.tree.map(lambda x: x[0], block), qi, qpi)
            block = jax.tree.map(lambda x: x[1:], block)
        count = block[0].shape[0]
        if count == 1:
            one = jax.tree.map(lambda x: x[0], block)
            # One tile per step: the whole-block skip in `fold` already decided.
            return update(stats, *one, qi, qpi) if (nq, nk) == (1, 1) else tile_ck(stats, one, qi, qpi)
        if count:
            stats, _ = jax.lax.scan(lambda st, kblock: (tile_ck(st, kblock, qi, qpi), None), stats, block)
        return stats

    fold_q = jax.checkpoint(fold_query_block) if nq > 1 else fold_query_block

    def fold_all(stats, block):
        """One ring step: every query block's fold, (nq, ...) statistics in and out."""
        if nq == 1:
            one = fold_q(None if stats is None else jax.tree.map(lambda x: x[0], stats), block, qs[0], qps[0])
            return jax.tree.map(lambda x: x[None], one)
        if stats is None:
            return jax.lax.map(lambda a: fold_q(None, block, *a), (qs, qps))
        return jax.lax.map(lambda a: fold_q(a[0], block, a[1], a[2]), (stats, qs, qps))

    def fold(stats, block):
        """`fold_all`, skipped (identity) when no query of this shard sees any key of the block."""
        kp, kvalid = block[2], block[3]  # (nk, b, bk)
        # Exact, and O(b * (t + s)) rather than the (b, t, s) mask.
        seen_any = jnp.any(kvalid & (kp <= q_last[None, :, None]))
        return jax.lax.cond(seen_any, fold_all, lambda st, _: st, stats, block)

    # Recompute each step's probabilities in the backward instead of saving
    # them: the residuals of a step are its inputs (stats and block).
    first, fold = jax.checkpoint(lambda block: fold_all(None, block)), jax.checkpoint(fold)

    # The own block (visible under causality unless the shard is all padding)
    # is folded unconditionally: the statistics then start as data, not as
    # constants, which (a) carry the same shard_map varying-axis types as
    # q, k, v, as lax.cond and lax.scan need under check_vma=True, and (b)
    # cannot be hoisted by XLA to the program start for every layer.
    stats = first(own)
    # Each device receives from its predecessor: after hop j it holds the
    # block of shard (i - j) mod P.
    perm = [(i, (i + 1) % axis_size) for i in range(axis_size)]

    def step(carry, _):
        stats, block = carry
        # Hop first, then fold what arrived; the fold of step j and the hop of
        # step j + 1 are independent, so the transfer can overlap compute.
        block = jax.lax.ppermute(block, axis_name, perm=perm)
        return (fold(stats, block), block), None

    # P - 1 hops: every shard's block is folded exactly once.
    if axis_size > 1:
        (stats, _), _ = jax.lax.scan(step, (stats, own), None, length=axis_size - 1)
    _, l, acc = stats  # (nq, b, kv, r, bq), (nq, b, kv, r, bq, d)

    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]  # rows that saw nothing: acc = 0, so 0
    out = rearrange(out, "q b k r t d -> b (q t) (k r) d")[:, :t]
    return out.astype(q.dtype)
