"""Nemotron-H hybrid causal language model (Flax NNX).

Each layer is a pre-norm residual block `h + mixer(rmsnorm(h))` whose mixer
is chosen by the layer's pattern char: `M` Mamba-2, `*` attention, `-` MLP.
A final RMSNorm and the (tied or untied) LM head give the logits.

Three ways to run it, all traceable under `jax.jit` / `nnx.jit`:
  model(input_ids, attention_mask=None)        -> logits (b, t, vocab)
  model.prefill(input_ids, attention_mask, n)  -> last logits, Cache of n slots
  model.decode(tokens, cache)                  -> logits, advanced Cache
`model.generate(...)` (see `hybridvlm.generate`) ties them together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybridvlm.cache import Cache, KVCache, Layout
from hybridvlm.config import ATTENTION, MAMBA, MLP, LMConfig
from hybridvlm.context.reduce import sharded_stage
from hybridvlm.generate import generate
from hybridvlm.layers.attention import Attention
from hybridvlm.layers.init import normal_param
from hybridvlm.layers.mamba2 import Mamba2Mixer
from hybridvlm.layers.mlp import MLP as MLPMixer
from hybridvlm.layers.norm import RMSNorm
from hybridvlm.ops.dense import dense
from hybridvlm.remat import remat_call, remat_policy
from hybridvlm.sharding import logical_constraint
from reduction import prune as rp
from reduction import scores as rs

class Block(nnx.Module):
    """Pre-norm residual block around one mixer."""

    def __init__(self, cfg: LMConfig, kind: str, *, rngs: nnx.Rngs, dtype):
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)
        if kind == MAMBA:
            self.mixer = Mamba2Mixer(cfg, rngs=rngs, dtype=dtype)
        elif kind == ATTENTION:
            self.mixer = Attention(cfg, rngs=rngs, dtype=dtype)
        elif kind == MLP:
            self.mixer = MLPMixer(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, rngs=rngs, dtype=dtype,
                                  seq_block=cfg.seq_block)
        else:  # LMConfig.validate rejects other kinds; kept as a guard.
            raise ValueError(f"layer kind {kind!r} is not supported")

    def __call__(self, h, layout: Layout, cache=None):
        """h: (b, t, d) -> (b, t, d), and this layer's updated cache entry."""
        x = self.norm(h)
        if self.kind == MLP:
            y = self.mixer(x)
        else:
            y, cache = self.mixer(x, layout, cache)
        return h + y.astype(h.dtype), cache


class NemotronHForCausalLM(nnx.Module):
    """The hybrid LM. `dtype` is the parameter and activation dtype."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([Block(cfg, kind, rngs=rngs, dtype=dtype) for kind in cfg.pattern])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        )

    # ---------------------------------------------------------------- pieces
    def embed_tokens(self, input_ids):
        """(b, t) int -> (b, t, d)."""
        return jnp.take(self.embed[...], input_ids, axis=0)

    def logits(self, h):
        """(b, t, d) final hidden states -> (b, t, vocab) float32 logits."""
        h = self.final_norm(h)
        w = self.embed[...] if self.lm_head is None else self.lm_head[...]
        # The head runs in its weight's dtype, as the reference does (the float32
        # residual is cast to it): a float32 h would promote a bfloat16 head to a
        # float32 copy (2.5 GiB at the 12B vocabulary).
        spec = "btd,vd->btv" if self.lm_head is None else "btd,dv->btv"
        return logical_constraint(dense(spec, h.astype(w.dtype), w).astype(jnp.float32), ("batch", "seq", "vocab"))

    def run_layers(self, h, layout: Layout, caches=None, *, reduction=None, visual=None, remat=None):
        """Runs every layer, pruning visual tokens where `reduction` says.

        Args:
          h: (b, t, d); layout: its Layout; caches: None or one entry per layer.
          reduction: None or a static `reduction.plan.ReductionPlan`.
          visual: (b, t) bool visual slots (needed with `reduction`): real
            visual tokens, and masked ones (layout.valid False) where a row's
            video is shorter than the batch's frame bucket.
          remat: None or a `REMAT_POLICIES` name: rematerialise each layer in
            the backward pass (`jax.checkpoint` per block; cache-less passes
            only, the training path). Forward values are unchanged.
        Returns:
          h (b, t', d) for the t' surviving tokens, and the new caches.
        """
        h, caches, _ = self.run_layers_with_layout(h, layout, caches, reduction=reduction, visual=visual,
                                                   remat=remat)
        return h, caches

    def run_layers_with_layout(self, h, layout: Layout, caches=None, *, reduction=None, visual=None, remat=None):
        """`run_layers`, also returning the survivors' Layout.

        Returns:
          h (b, t', d), the new caches, and the Layout (b, t') of the surviving
          tokens: `layout.index[r, j]` is the position in the input sequence
          of row r's j-th survivor (ascending: pruning keeps order).
        """
        stages = dict(reduction.stages) if reduction is not None else {}
        num_visual = reduction.num_visual if reduction is not None else 0
        policy = remat_policy(remat)
        if policy is not None and caches is not None:
            raise ValueError("remat= applies to cache-less (training) passes only; got caches as well")
        new = []
        for i, layer in enumerate(self.layers):
            if i in stages and layout.sequence_axis is not None:
                # A sequence shard: global top-k over all shards, then equal blocks again.
                h, layout, visual = sharded_stage(self, i, h, layout, visual, reduction, num_visual, stages[i])
                num_visual = stages[i]
            elif i in stages:  # even keep-all stages run, so the path is exercised
                order = self._stage_order(i, h, layout, visual, reduction, num_visual, stages[i])
                h = jnp.take_along_axis(h, order[..., None], axis=1)
                layout, visual = layout.take(order), jnp.take_along_axis(visual, order, axis=1)
                num_visual = stages[i]
            # The residual stream between blocks: rows over the data-parallel axes (a no-op without a mesh).
            h = logical_constraint(h, ("batch", "seq", "embed"))
            if policy is None:
                h, c = layer(h, layout, None if caches is None else caches[i])
            else:
                h, c = remat_call(layer, policy, h, layout), None
            new.append(c)
        return h, (None if caches is None else tuple(new)), layout

    def _stage_order(self, i, h, layout, visual, plan, num_visual: int, keep: int):
        """(b, t') indices of the tokens kept before layer i: `keep` of the
        `num_visual` visual slots of each row (see `reduction.prune`)."""
        scores, key = None, None
        if plan.selector == "score":
            # Selection is discrete (top-k indices): no gradient flows through the
            # scores. Stopping it here says so and keeps autodiff from linearising
            # the scoring projections at all; forward values are unchanged.
            scores = jax.lax.stop_gradient(
                self.visual_scores(i, jax.lax.stop_gradient(h), layout, visual, plan.scorer))
        elif plan.selector == "random":
            key = jax.random.fold_in(jax.random.key(plan.seed), i)
        return rp.stage_order(scores, visual, layout.valid, keep, num_visual=num_visual, selector=plan.selector,
                              key=key)

    def scoring_layer(self, i: int) -> int:
        """The layer whose projections score tokens before layer i: i itself, or,
        for an MLP layer (token-wise, so pruning before it equals pruning
        after it), the next Mamba / attention layer, else the previous one."""
        mixers = [j for j, layer in enumerate(self.layers) if layer.kind in (MAMBA, ATTENTION)]
        later = [j for j in mixers if j >= i]
        if later:
            return later[0]
        if mixers:
            return mixers[-1]
        raise ValueError("the model has no Mamba or attention layer to score visual tokens with")

    def visual_scores(self, i: int, h, layout: Layout, visual, score_cfg):
        """Language-aware scores (b, t) of the visual tokens entering layer i.

        The query is the text after the last visual token of each row (the
        question follows the video). Attention layers: softmax attention of
        the query rows; Mamba layers: the implicit-attention proxy C_q . B_j.
        Masked visual slots (layout.valid False) get no score.
        """
        return self.scores_from_features(i, self.scoring_features(i, h, layout), layout, visual, score_cfg)

    def scoring_features(self, i: int, h, layout: Layout) -> dict:
        """The per-token projections that score the visual tokens entering layer i:
        {"q", "k"} (b, t, heads, head_dim) of an attention scoring layer, or
        {"C", "B"} (b, t, g, n) and "dt" (b, t, h) of a Mamba one (all token-wise,
        so a sequence shard computes its own and `hybridvlm.context` gathers them)."""
        layer = self.layers[self.scoring_layer(i)]
        x = layer.norm(h)
        if layer.kind == ATTENTION:
            q, k = layer.mixer.project_qk(x, layout)
            return dict(q=q, k=k)
        halo = layout.sequence_axis
        p = layer.mixer.project_scoring(x, layout, halo=halo)
        return dict(C=p["C"], B=p["B"], dt=p["dt"])

    def scores_from_features(self, i: int, feats: dict, layout: Layout, visual, score_cfg):
        """`visual_scores` from `scoring_features` of the whole sequence (b, t); an
        attention layer's "q" may hold only the last rows (at least the query window)."""
        layer = self.layers[self.scoring_layer(i)]
        visual = visual & layout.valid  # masked slots are never scored
        last_visual = jnp.max(jnp.where(visual, layout.index, -1), axis=1, keepdims=True)
        query = layout.valid & (layout.index > last_visual)
        # Query rows are read from a static window at the end of the sequence.
        num_query = min(score_cfg.max_query, layout.valid.shape[1])
        if layer.kind == ATTENTION:
            return rs.attention_scores(feats["q"], feats["k"], num_query=num_query, query_mask=query,
                                       visual_mask=visual, key_valid=layout.valid,
                                       scale=self.config.head_dim ** -0.5, cfg=score_cfg)
        A = -jnp.exp(layer.mixer.A_log[...].astype(jnp.float32))
        return rs.mamba_scores(feats["C"], feats["B"], feats["dt"], A, num_query=num_query, query_mask=query,
                               visual_mask=visual, key_valid=layout.valid, cfg=score_cfg)

    def layerwise_visual_scores(self, h, layout: Layout, visual, score_cfg, *, num_visual: int):
        """Visual-token scores entering every layer of an unpruned forward pass.

        Args:
          h: (b, t, d) input embeddings (text + scattered visual tokens).
          layout: `Layout` of the prompt (`Layout.prompt(attention_mask)`).
          visual: (b, t) bool visual-token mask with `num_visual` True per row.
          score_cfg: `reduction.scores.ScoreConfig`.
          num_visual: static V.
        Returns:
          (num_layers, b, V) float32: [i, r] holds the scores of row r's visual
          tokens (in sequence order) on the hidden states entering layer i (an
          MLP layer is scored with the next mixer's projections).
        """
        if num_visual < 1:
            raise ValueError("layerwise_visual_scores needs at least one visual token per row")
        # Visual positions first (stable: in sequence order), then the rest.
        order = jnp.argsort(~visual, axis=1, stable=True)[:, :num_visual]  # (b, V)
        out = []
        for i, layer in enumerate(self.layers):
            s = self.visual_scores(i, h, layout, visual, score_cfg)  # (b, t)
            out.append(jnp.take_along_axis(s, order, axis=1).astype(jnp.float32))
            h, _ = layer(h, layout)
        return jnp.stack(out)

    # ----------------------------------------------------------------- modes
    def __call__(self, input_ids, *, attention_mask=None, inputs_embeds=None, reduction=None, visual_mask=None):
        """Full-sequence forward.

        Args:
          input_ids: (b, t) int token ids (left padding allowed).
          attention_mask: (b, t) 1 for tokens, 0 for padding and masked visual
            slots; None = all ones.
          inputs_embeds: optional (b, t, d) embeddings used instead of
            embedding input_ids (the VLM passes text + visual embeddings).
          reduction: optional static ReductionPlan (prunes visual tokens).
          visual_mask: (b, t) bool visual slots, required with `reduction`:
            every row holds `reduction.num_visual` of them, real or masked
            (attention_mask 0: a video shorter than the batch's frame bucket).
        Returns:
          logits (b, t', vocab) float32; t' = t minus the pruned tokens (the
          survivors keep their order, so [:, -1] is still the last token).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        self.check_inputs(input_ids, attention_mask, reduction=reduction, visual_mask=visual_mask,
                          inputs_embeds=inputs_embeds)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h, _ = self.run_layers(h, Layout.prompt(attention_mask), reduction=reduction, visual=visual_mask)
        return self.logits(h)

    def check_inputs(self, input_ids, attention_mask=None, *, reduction=None, visual_mask=None, inputs_embeds=None):
        """Refuses bad inputs before anything is traced or run.

        Shapes are always checked, and a plan against the layout
        (`ReductionPlan.check_fits`); the visual slots of each row only when
        `visual_mask` is concrete (under jit the caller's batching guarantees
        them: `hybridvlm.batch` pads every row to the frame bucket).
        """
        shape = tuple(input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {shape}")
        for name, a in (("attention_mask", attention_mask), ("visual_mask", visual_mask)):
            if a is not None and tuple(a.shape) != shape:
                raise ValueError(f"{name} shape {tuple(a.shape)} != input_ids shape {shape}")
        if inputs_embeds is not None and tuple(inputs_embeds.shape[:2]) != shape:
            raise ValueError(f"inputs_embeds shape {tuple(inputs_embeds.shape)} does not start with input_ids "
                             f"shape {shape}")
        if reduction is None:
            return
        if visual_mask is None:
            raise ValueError("reduction= needs visual_mask (b, t): which tokens are visual slots")
        slots = None if isinstance(visual_mask, jax.core.Tracer) else np.asarray(visual_mask).sum(axis=1)
        reduction.check_fits(num_layers=self.num_layers, seq_len=shape[1], visual_slots=slots)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def init_cache(self, batch: int, sizes) -> tuple:
        """Per-layer cache entries, zero-filled.

        sizes: slots of each attention layer (an int for all, or a sequence
        indexed by layer; layers after a reduction stage need fewer).
        """
        cfg = self.config
        entries = []
        for i, layer in enumerate(self.layers):
            if layer.kind == ATTENTION:
                size = sizes if isinstance(sizes, int) else sizes[i]
                entries.append(KVCache.zeros(batch, size, cfg.num_key_value_heads, cfg.head_dim, self.dtype))
            elif layer.kind == MAMBA:
                entries.append(layer.mixer.zero_state(batch, self.dtype))
            else:
                entries.append(None)
        return tuple(entries)

    def prefill(self, input_ids, attention_mask, cache_size: int, *, inputs_embeds=None, reduction=None,
                visual_mask=None):
        """Runs the prompt and returns the cache for decoding.

        Args:
          input_ids, attention_mask: (b, t) left-padded prompt.
          cache_size: static number of cache slots (>= t), e.g. t + max_new_tokens;
            an attention layer after a reduction stage gets fewer, holding only
            the tokens that reached it.
          inputs_embeds: optional (b, t, d) embeddings replacing input_ids'.
          reduction, visual_mask: as in `__call__`.
        Returns:
          logits of the last position (b, vocab) float32, and a Cache.
        """
        b, t = input_ids.shape
        if cache_size < t:
            raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {t}")
        self.check_inputs(input_ids, attention_mask, reduction=reduction, visual_mask=visual_mask,
                          inputs_embeds=inputs_embeds)
        layout = Layout.prompt(attention_mask)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        sizes = cache_size
        if reduction is not None:
            sizes = [cache_size - (reduction.num_visual - reduction.keep_at(i)) for i in range(self.num_layers)]
        h, caches = self.run_layers(h, layout, self.init_cache(b, sizes), reduction=reduction, visual=visual_mask)
        cache = Cache(layers=caches, length=jnp.int32(t),
                      next_rope_pos=jnp.sum(layout.valid, axis=1, dtype=jnp.int32))
        return self.logits(h[:, -1:])[:, 0], cache

    def decode(self, tokens, cache: Cache):
        """Appends tokens after the cache's content.

        Args:
          tokens: (b, t) int, usually t = 1; all valid.
          cache: from `prefill` or a previous `decode`.
        Returns:
          logits (b, t, vocab) float32 and the advanced Cache.
        """
        b, t = tokens.shape
        steps = jnp.arange(t, dtype=jnp.int32)
        layout = Layout(
            index=jnp.broadcast_to(cache.length + steps, (b, t)), valid=jnp.ones((b, t), bool),
            rope_pos=cache.next_rope_pos[:, None] + steps, decode=True,
        )
        h, caches = self.run_layers(self.embed_tokens(tokens), layout, cache.layers)
        new = Cache(layers=caches, length=cache.length + t, next_rope_pos=cache.next_rope_pos + t)
        return self.logits(h), new

    @property
    def text_config(self) -> LMConfig:
        """The language model's config (the VLM exposes the same property)."""
        return self.config

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Autoregressive generation; see `hybridvlm.generate.generate`."""
        return generate(self, input_ids, attention_mask, **kwargs)
