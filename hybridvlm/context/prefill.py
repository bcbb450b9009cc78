"""The hybrid LM's prompt pass with the sequence split across devices (context parallelism).

    mesh = jax.make_mesh((8,), ("sequence",), axis_types=(AxisType.Auto,))   # or (4, 2): ("sequence", "tensor")
    h, kept = context_parallel_hidden(lm, embeds, mask, mesh=mesh)       # training forward (differentiable)
    logits, cache = context_parallel_prefill(lm, ids, mask, cache_size, mesh=mesh,
                                             reduction=shard_plan(plan, 8), visual_mask=ids == image_id)
    logits, cache = lm.decode(next_tokens, cache)               # the ordinary decode loop

One `jax.shard_map` over the mesh's "sequence" axis runs every layer; each
device holds a contiguous block of t / P tokens of every row (the other mesh
axes stay under GSPMD, so weights keep their tensor / fsdp sharding). Inside,
the shard's `Layout` carries global positions and the axis
(`Layout.sequence_axis`), and the layers exchange what crosses shard edges:

- Mamba-2: the conv's (k - 1)-token halo from the previous shard, and the SSM
  state carried across shards by an associative scan of (decay, state) pairs
  (`hybridvlm.context.mamba`);
- attention: ring attention, key/value blocks passed around the axis with
  `ppermute` (`hybridvlm.context.ring_attention`);
- MLP: token-wise, nothing to exchange;
- a reduction plan's stages: scoring features gathered, the global top-k with
  the plan's static k, survivors rebalanced into equal blocks
  (`hybridvlm.context.reduce`).

Results equal the one-device pass (tests/test_context_parallel.py). A prompt of
t tokens needs t divisible by P, t / P >= conv_kernel - 1, and every stage's
dropped count a multiple of P (`shard_plan` rounds a plan's keep counts up to
that). The VLM's vision tower and EVS run before the split, under GSPMD
(`context_parallel_vlm_prefill`).

The mesh's axes must be Auto (`jax.sharding.AxisType.Auto`, as `train.mesh.make_mesh`
builds them): inputs are resharded onto the sequence split by the compiler.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hybridvlm.cache import Cache, KVCache, Layout, MambaState
from hybridvlm.context.reduce import check_stage_split
from reduction.plan import ReductionPlan

SEQUENCE_AXIS = "sequence"


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Where a prompt's LM layers run split along the sequence: `mesh`'s `axis`.

    Passed as `sequence=` to `NemotronHVLModel.hidden_states` and the training loss
    (`train.loss.answer_loss`); `train.finetune` builds it from `mesh.sequence`.
    """

    mesh: Mesh
    axis: str = SEQUENCE_AXIS

    def __post_init__(self):
        if self.axis not in self.mesh.shape:
            raise ValueError(f"mesh has no {self.axis!r} axis (its axes: {', '.join(self.mesh.axis_names)})")

    @property
    def shards(self) -> int:
        return int(self.mesh.shape[self.axis])


def _check(mesh, axis: str, t: int, conv_kernel: int) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no {axis!r} axis (its axes: {', '.join(mesh.axis_names)})")
    shards = mesh.shape[axis]
    if t % shards:
        raise ValueError(f"a prompt of {t} tokens does not split into {shards} equal {axis!r} shards; "
                         f"pad it to a multiple of {shards}")
    if t // shards < conv_kernel - 1:
        raise ValueError(f"{shards} {axis!r} shards of {t // shards} tokens are shorter than the Mamba conv's "
                         f"{conv_kernel - 1}-token halo")
    return shards


def shard_layout(valid, axis: str, shards: int) -> Layout:
    """The Layout of this shard's block of a left-padded prompt (inside shard_map).

    valid: (b, t_local) bool. Positions are global (shard i starts at i * t_local);
    RoPE positions count the valid tokens of the earlier shards too.
    """
    b, t = valid.shape
    me = jax.lax.axis_index(axis)
    index = jnp.broadcast_to(me * t + jnp.arange(t, dtype=jnp.int32), (b, t))
    counts = jax.lax.all_gather(jnp.sum(valid, axis=1, dtype=jnp.int32), axis)  # (P, b)
    before = jnp.sum(jnp.where(jnp.arange(shards)[:, None] < me, counts, 0), axis=0)  # (b,)
    rope_pos = jnp.maximum(before[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    return Layout(index=index, valid=valid, rope_pos=rope_pos, sequence_axis=(axis, shards))


def _layer_specs(lm, axis: str):
    """out_specs of the per-layer cache entries the body returns (see `_entries`)."""
    specs = []
    for entry in lm.init_cache(1, 1):
        if isinstance(entry, KVCache):
            specs.append((P(None, axis), P(None, axis), P(None, axis)))  # k, v, valid: slots along the sequence
        elif isinstance(entry, MambaState):
            specs.append((P(axis), P(axis)))  # per-shard states, stacked; the last shard's is the prompt's
        else:
            specs.append(None)
    return tuple(specs)


def _entries(caches):
    """The shard's cache entries as plain arrays for shard_map's outputs."""
    out = []
    for c in caches:
        if isinstance(c, KVCache):
            out.append((c.k, c.v, c.valid))
        elif isinstance(c, MambaState):
            out.append((c.conv[None], c.ssm[None]))
        else:
            out.append(None)
    return tuple(out)


def shard_plan(plan: ReductionPlan | None, shards: int) -> ReductionPlan | None:
    """`plan` with each stage keeping just enough more tokens that its dropped count,
    num_visual - keep, is a multiple of `shards` (at most shards - 1 more per stage), so
    a prompt whose length divides into the shards still does after every stage."""
    if plan is None:
        return None
    stages = tuple((layer, plan.num_visual - (plan.num_visual - keep) // shards * shards)
                   for layer, keep in plan.stages)
    return dataclasses.replace(plan, stages=stages)


def _local_sizes(lm, plan, t: int, shards: int) -> list[int]:
    """Tokens per shard entering each layer (the local KV cache sizes)."""
    sizes, left = [], t
    stages = dict(plan.stages) if plan is not None else {}
    for i in range(lm.num_layers):
        if i in stages:
            left = check_stage_split(t, plan.num_visual - stages[i], shards, i) * shards
        sizes.append(left // shards)
    return sizes


def _run(lm, h, attention_mask, *, mesh, axis: str, with_cache: bool, remat=None, reduction=None, visual_mask=None,
         wide_weights: bool = False):
    """(h (b, t', d) final hidden states, kept positions (b, t') int32, the per-layer entries or None).

    wide_weights: low-precision floating weights enter the shard_map as float32 and are cast
    back inside, so their gradients (summed over the axis in the backward pass) are float32:
    XLA's CPU compiler aborts on that sum in bfloat16 ("Invalid binary instruction opcode
    copy", jax 0.10.2). The training forward sets it; a prefill keeps the weights as they are.
    """
    b, t = attention_mask.shape
    shards = _check(mesh, axis, t, lm.config.conv_kernel)
    sizes = _local_sizes(lm, reduction, t, shards)
    graphdef, state = nnx.split(lm)
    if visual_mask is None:
        visual_mask = jnp.zeros((b, t), bool)
    dtypes = jax.tree.map(lambda x: x.dtype, state)
    if wide_weights:
        low = lambda x: jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
        state = jax.tree.map(lambda x: x.astype(jnp.float32) if low(x) else x, state)

    def body(state, h, valid, visual):
        state = jax.tree.map(lambda x, d: x.astype(d), state, dtypes)
        model = nnx.merge(graphdef, state)
        layout = shard_layout(valid, axis, shards)
        caches = model.init_cache(b, sizes) if with_cache else None
        h, caches, layout = model.run_layers_with_layout(h, layout, caches, reduction=reduction, visual=visual,
                                                         remat=remat)
        return h, layout.index, (_entries(caches) if with_cache else None)

    seq = P(None, axis)
    out_specs = (seq, seq, _layer_specs(lm, axis) if with_cache else None)
    # check_vma=False: the layers' scans start from fresh zeros (invariant across
    # shards) and carry shard-varying values; the equality tests check the results.
    run = jax.shard_map(body, mesh=mesh, in_specs=(P(), seq, seq, seq), out_specs=out_specs,
                        axis_names={axis}, check_vma=False)
    return run(state, h, attention_mask.astype(bool), visual_mask.astype(bool))


def context_parallel_hidden(lm, inputs_embeds, attention_mask, *, mesh, axis: str = SEQUENCE_AXIS, remat=None,
                            reduction=None, visual_mask=None):
    """Final hidden states (before the final norm) of a prompt, sequence-parallel.

    Args:
      lm: a `NemotronHForCausalLM`.
      inputs_embeds: (b, t, d); attention_mask: (b, t), 0 on (left) padding.
      mesh: a mesh with an `axis` axis; t divisible by its size.
      remat: None or a `hybridvlm.remat.REMAT_POLICIES` name, per layer.
      reduction, visual_mask: an optional static ReductionPlan and the (b, t) visual
        slots, as `NemotronHForCausalLM.__call__` (see `shard_plan`).
    Returns:
      h (b, t', d) and the input position of each survivor (b, t') int32, equal to
      `lm.run_layers_with_layout(inputs_embeds, Layout.prompt(mask), ...)`'s h and
      layout.index (differentiable: the training forward).
    """
    lm.check_inputs(jnp.zeros(attention_mask.shape, jnp.int32), attention_mask, reduction=reduction,
                    visual_mask=visual_mask, inputs_embeds=inputs_embeds)
    h, index, _ = _run(lm, inputs_embeds, attention_mask, mesh=mesh, axis=axis, with_cache=False, remat=remat,
                       reduction=reduction, visual_mask=visual_mask, wide_weights=True)
    return h, index


def context_parallel_prefill(lm, input_ids, attention_mask, cache_size: int, *, mesh, axis: str = SEQUENCE_AXIS,
                             inputs_embeds=None, reduction=None, visual_mask=None):
    """`lm.prefill` with the prompt's layers run sequence-parallel over `axis`.

    Args: as `NemotronHForCausalLM.prefill`, plus the mesh (see `shard_plan` for plans).
    Returns:
      logits of the last position (b, vocab) float32, and a `Cache` the ordinary
      `lm.decode` continues from (KV slots in sequence order, each attention layer
      holding the tokens that reached it; the Mamba states of the prompt's end).
    """
    b, t = input_ids.shape
    if cache_size < t:
        raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {t}")
    lm.check_inputs(input_ids, attention_mask, reduction=reduction, visual_mask=visual_mask,
                    inputs_embeds=inputs_embeds)
    h = lm.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    h, _, entries = _run(lm, h, attention_mask, mesh=mesh, axis=axis, with_cache=True, reduction=reduction,
                         visual_mask=visual_mask)
    sizes = cache_size
    if reduction is not None:
        sizes = [cache_size - (reduction.num_visual - reduction.keep_at(i)) for i in range(lm.num_layers)]
    layers = []
    for fresh, entry in zip(lm.init_cache(b, sizes), entries):
        if isinstance(fresh, KVCache):
            layers.append(fresh.write(*entry))
        elif isinstance(fresh, MambaState):
            conv, ssm = entry
            layers.append(MambaState(conv=conv[-1].astype(fresh.conv.dtype), ssm=ssm[-1]))
        else:
            layers.append(None)
    valid = attention_mask.astype(bool)
    cache = Cache(layers=tuple(layers), length=jnp.int32(t), next_rope_pos=jnp.sum(valid, axis=1, dtype=jnp.int32))
    return lm.logits(h[:, -1:])[:, 0], cache


def context_parallel_vlm_prefill(vlm, input_ids, attention_mask, cache_size: int, *, mesh,
                                 axis: str = SEQUENCE_AXIS, pixel_values_videos=None, pixel_values=None,
                                 reduction=None):
    """`NemotronHVLModel.prefill` with the LM's layers sequence-parallel over `axis`.

    The vision tower, projector and EVS run first (under GSPMD, unsplit); the
    prompt they give (t' tokens after EVS, t' divisible by the axis size) is then
    split along the sequence. `vlm.decode` continues from the returned cache.
    """
    vlm.check_inputs(input_ids, attention_mask, reduction=reduction, pixel_values_videos=pixel_values_videos,
                     pixel_values=pixel_values)
    ids, mask, h = vlm.prepare(input_ids, attention_mask, pixel_values_videos, pixel_values)
    return context_parallel_prefill(vlm.language_model, ids, mask, cache_size, mesh=mesh, axis=axis,
                                    inputs_embeds=h, reduction=reduction, visual_mask=vlm.visual_mask(ids, reduction))
