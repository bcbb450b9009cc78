"""A token-reduction stage on a sequence split across devices: global top-k, then rebalancing.

Inside `jax.shard_map` over the "sequence" axis (P shards of t tokens each),
a stage before layer i keeps `keep` of the row's visual tokens, chosen over
the WHOLE sequence exactly as on one device:

1. Scoring features. Each shard projects its own tokens with the scoring
   layer (`NemotronHForCausalLM.scoring_features`: k and q of an attention
   layer, or B, C and dt of a Mamba one, whose conv takes its halo from the
   previous shard) and the features are all-gathered along the sequence;
   of q only each shard's last min(max_query, t) rows travel, enough for the
   question window at the end of the sequence. These are a few head-widths
   per token, far less than the hidden states (kv * head_dim or 2 g n + h
   values against hidden_size), and every shard then computes the same
   global scores (O(num_query * P t) per shard, the cost of one device).
2. Selection. The same `reduction.prune.stage_order` as one device, on the
   gathered (b, P t) scores and masks: the kept set is the global top-k with
   the plan's static k, identical on every shard.
3. Rebalancing. The survivors (T' = P t - dropped per row, order kept) are
   cut into P equal blocks again; shard i needs the survivors
   [i T'/P, (i+1) T'/P). Hidden-state blocks travel round the ring with
   `ppermute` (P - 1 hops of (b, t, d)) and each shard picks its survivors
   from the block it holds at each hop, so no device ever holds more than two
   blocks of hidden states. Positions, validity and the visual mask come from
   the gathered (b, P t) layout arrays.

T' must be divisible by P (a static shape per shard): the stage's dropped
count, num_visual - keep, a multiple of P when the prompt length is one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybridvlm.cache import Layout
from reduction import prune as rp


def _gather(x, axis: str):
    """(b, t, ...) per shard -> (b, P t, ...), the whole sequence in order."""
    return jax.lax.all_gather(x, axis, axis=1, tiled=True)


def check_stage_split(seq_len: int, dropped: int, shards: int, layer: int) -> int:
    """The per-shard length after a stage that drops `dropped` of `seq_len` tokens."""
    left = seq_len - dropped
    if left % shards:
        raise ValueError(f"the reduction stage before layer {layer} leaves {left} of {seq_len} tokens, which do "
                         f"not split into {shards} equal sequence shards; choose a plan whose dropped counts are "
                         f"multiples of {shards} (`hybridvlm.context.prefill.shard_plan`)")
    return left // shards


def rebalance(h, dest, axis: str, shards: int):
    """This shard's new block of hidden states, gathered round the ring.

    h: (b, t, d) this shard's tokens; dest: (b, t') int32 global source position of
    each of the shard's new tokens (ascending). Returns (b, t', d).
    """
    t = h.shape[1]
    src_shard, src_local = dest // t, dest % t
    me = jax.lax.axis_index(axis)
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    out = jnp.zeros(dest.shape + h.shape[2:], h.dtype)
    block = h
    for hop in range(shards):
        owner = (me - hop) % shards  # after `hop` hops this shard holds shard (me - hop)'s block
        picked = jnp.take_along_axis(block, src_local[..., None], axis=1)
        out = jnp.where((src_shard == owner)[..., None], picked, out)
        if hop < shards - 1:
            block = jax.lax.ppermute(block, axis, perm)
    return out


def sharded_stage(lm, i: int, h, layout: Layout, visual, plan, num_visual: int, keep: int):
    """The stage before layer i on one sequence shard (see the module docstring).

    Args:
      lm: the `NemotronHForCausalLM`; h: (b, t, d) this shard's hidden states;
      layout: its Layout (global positions, `sequence_axis` set); visual: (b, t) bool;
      plan: the ReductionPlan; num_visual: visual slots per row before the stage; keep: after.
    Returns:
      h (b, t', d), layout and visual (b, t') of this shard's block of the survivors.
    """
    axis, shards = layout.sequence_axis
    b, t = visual.shape
    t_new = check_stage_split(t * shards, num_visual - keep, shards, i)
    g_layout = Layout(index=_gather(layout.index, axis), valid=_gather(layout.valid, axis),
                      rope_pos=_gather(layout.rope_pos, axis))
    g_visual = _gather(visual, axis)
    scores, key = None, None
    if plan.selector == "score":
        feats = lm.scoring_features(i, jax.lax.stop_gradient(h), layout)
        if "q" in feats:  # only the question window at the end of the sequence is read
            rows = min(plan.scorer.max_query, t)
            feats["q"] = feats["q"][:, t - rows:]
        feats = {name: _gather(f, axis) for name, f in feats.items()}
        if "q" in feats:
            feats["q"] = feats["q"][:, feats["q"].shape[1] - min(plan.scorer.max_query, t * shards):]
        scores = jax.lax.stop_gradient(lm.scores_from_features(i, feats, g_layout, g_visual, plan.scorer))
    elif plan.selector == "random":
        key = jax.random.fold_in(jax.random.key(plan.seed), i)
    order = rp.stage_order(scores, g_visual, g_layout.valid, keep, num_visual=num_visual, selector=plan.selector,
                           key=key)  # (b, P t'), the same on every shard
    me = jax.lax.axis_index(axis)
    dest = jax.lax.dynamic_slice_in_dim(order, me * t_new, t_new, axis=1)
    # The gathered layout is the whole sequence's; the shard's block of it is a shard again.
    new_layout = g_layout.take(dest).replace(decode=layout.decode, sequence_axis=layout.sequence_axis)
    return rebalance(h, dest, axis, shards), new_layout, jnp.take_along_axis(g_visual, dest, axis=1)
