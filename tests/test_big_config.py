"""The paper's 12B LM, checked abstractly (jax.eval_shape: nothing is allocated)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from configs import nemotron_h_12b
from hybridvlm import LMConfig, NemotronHForCausalLM
from hybridvlm.cache import KVCache, MambaState


def _abstract_model():
    cfg = LMConfig(**nemotron_h_12b.get_config().model)
    return nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))


def test_12b_parameter_count():
    model = _abstract_model()
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # Nemotron-Nano-12B-v2's LM has about 12.3B parameters.
    assert 12.0e9 < n < 12.6e9, n


def test_12b_prefill_and_decode_shapes():
    model = _abstract_model()
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((2, 4096), jnp.int32)

    def prefill(state, ids):
        m = nnx.merge(graphdef, state)
        return m.prefill(ids, jnp.ones(ids.shape, bool), ids.shape[1] + 16)

    last, cache = jax.eval_shape(prefill, state, ids)
    assert last.shape == (2, 131072) and last.dtype == jnp.float32
    kinds = [type(c) for c in cache.layers]
    assert kinds.count(KVCache) == 6 and kinds.count(MambaState) == 28
    kv = cache.layers[7]
    assert kv.k.shape == (2, 4096 + 16, 8, 128)
    mamba = cache.layers[0]
    assert mamba.ssm.shape == (2, 128, 80, 128) and mamba.ssm.dtype == jnp.float32
    assert mamba.conv.shape == (2, 3, 128 * 80 + 2 * 8 * 128)

    def decode(state, tok, cache):
        return nnx.merge(graphdef, state).decode(tok, cache)

    logits, cache2 = jax.eval_shape(decode, state, jax.ShapeDtypeStruct((2, 1), jnp.int32), cache)
    assert logits.shape == (2, 1, 131072)
    assert jax.tree.structure(cache2) == jax.tree.structure(cache)
