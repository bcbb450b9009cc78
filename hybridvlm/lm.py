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
from flax import nnx

from hybridvlm.cache import Cache, KVCache, Layout, MambaState
from hybridvlm.config import ATTENTION, MAMBA, MLP, LMConfig
from hybridvlm.layers.attention import Attention
from hybridvlm.layers.init import normal_param
from hybridvlm.layers.mamba2 import Mamba2Mixer
from hybridvlm.layers.mlp import MLP as MLPMixer
from hybridvlm.layers.norm import RMSNorm


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
            self.mixer = MLPMixer(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, rngs=rngs, dtype=dtype)
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
        if self.lm_head is None:
            out = jnp.einsum("btd,vd->btv", h, self.embed[...])
        else:
            out = jnp.einsum("btd,dv->btv", h, self.lm_head[...])
        return out.astype(jnp.float32)

    def run_layers(self, h, layout: Layout, caches=None):
        """Runs every layer. caches: None or a tuple with one entry per layer."""
        new = []
        for i, layer in enumerate(self.layers):
            h, c = layer(h, layout, None if caches is None else caches[i])
            new.append(c)
        return h, (None if caches is None else tuple(new))

    # ----------------------------------------------------------------- modes
    def __call__(self, input_ids, *, attention_mask=None, inputs_embeds=None):
        """Full-sequence forward.

        Args:
          input_ids: (b, t) int token ids (left padding allowed).
          attention_mask: (b, t) 1 for tokens, 0 for padding; None = all ones.
          inputs_embeds: optional (b, t, d) embeddings used instead of
            embedding input_ids (the VLM passes text + visual embeddings).
        Returns:
          logits (b, t, vocab) float32.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h, _ = self.run_layers(h, Layout.prompt(attention_mask))
        return self.logits(h)

    def init_cache(self, batch: int, size: int) -> tuple:
        """Per-layer cache entries for `size` slots, zero-filled."""
        cfg = self.config
        entries = []
        for layer in self.layers:
            if layer.kind == ATTENTION:
                entries.append(KVCache.zeros(batch, size, cfg.num_key_value_heads, cfg.head_dim, self.dtype))
            elif layer.kind == MAMBA:
                entries.append(layer.mixer.zero_state(batch, self.dtype))
            else:
                entries.append(None)
        return tuple(entries)

    def prefill(self, input_ids, attention_mask, cache_size: int, *, inputs_embeds=None):
        """Runs the prompt and returns the cache for decoding.

        Args:
          input_ids, attention_mask: (b, t) left-padded prompt.
          cache_size: static number of cache slots (>= t), e.g. t + max_new_tokens.
          inputs_embeds: optional (b, t, d) embeddings replacing input_ids'.
        Returns:
          logits of the last position (b, vocab) float32, and a Cache.
        """
        b, t = input_ids.shape
        if cache_size < t:
            raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {t}")
        layout = Layout.prompt(attention_mask)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h, caches = self.run_layers(h, layout, self.init_cache(b, cache_size))
        valid = jnp.zeros((b, cache_size), bool).at[:, :t].set(layout.valid)
        cache = Cache(
            layers=caches, valid=valid, length=jnp.int32(t),
            next_rope_pos=jnp.sum(layout.valid, axis=1, dtype=jnp.int32),
        )
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
        start = cache.length
        index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, t), bool), (0, start))
        layout = Layout(
            index=index, valid=jnp.ones((b, t), bool),
            rope_pos=cache.next_rope_pos[:, None] + jnp.arange(t, dtype=jnp.int32),
            start=start, kv_valid=valid,
        )
        h, caches = self.run_layers(self.embed_tokens(tokens), layout, cache.layers)
        new = Cache(layers=caches, valid=valid, length=start + t, next_rope_pos=cache.next_rope_pos + t)
        return self.logits(h), new

    @property
    def text_config(self) -> LMConfig:
        """The language model's config (the VLM exposes the same property)."""
        return self.config

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Autoregressive generation; see `hybridvlm.generate.generate`."""
        from hybridvlm.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)
