"""Mesh and logical-axis sharding (train/mesh.py, hybridvlm/sharding.py).

In-process (1 device): the rule table covers every logical name of the tiny
LM, the tiny VLM and the 12B LM (abstract models), the 12B LM shards without
fallback on a 64-device fsdp 8 x tensor 8 mesh, the resolver's fallbacks, and
MeshConfig validation. In a subprocess with 8 fake CPU devices (the device
count is fixed when JAX starts): a data 2 x fsdp 2 x tensor 2 mesh, weights
split along their model-parallel axes, `init_sharded` / `shard_model`
layouts, activation constraints, and sharded forward logits equal to the
unsharded model's.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import nemotron_h_12b, tiny_vlm
from eval.inputs import build_tiny_vlm
from hybridvlm import LMConfig, NemotronHForCausalLM
from hybridvlm.radio import RadioConfig
from hybridvlm.vlm import NemotronHVLModel, VLMConfig
from tests.conftest import tiny_config
from train.mesh import MeshConfig, make_mesh
from hybridvlm.sharding import LOGICAL_RULES, logical_names, logical_specs, mesh_spec, param_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_vlm_config() -> VLMConfig:
    """tests/conftest.py's tiny LM under a one-block tower (width 32, 2 heads): every
    parameter kind of the VLM at the smallest sizes the 2 x 2 x 2 mesh divides."""
    vision = RadioConfig(hidden_size=32, num_layers=1, num_heads=2, patch_size=16, max_img_size=64, mlp_ratio=2.0,
                         num_cls_tokens=1, num_registers=1, video_temporal_patch_size=2)
    return VLMConfig(text=tiny_config(), vision=vision, image_token_id=63, projector_hidden_size=64, image_size=64)


def _abstract_models():
    big = LMConfig(**nemotron_h_12b.get_config().model)
    return {
        "tiny_lm": nnx.eval_shape(lambda: NemotronHForCausalLM(tiny_config(), rngs=nnx.Rngs(0))),
        "tiny_vlm": nnx.eval_shape(lambda: build_tiny_vlm(tiny_vlm.get_config())),
        "small_vlm": nnx.eval_shape(lambda: NemotronHVLModel(small_vlm_config(), rngs=nnx.Rngs(0))),
        "12b_lm": nnx.eval_shape(lambda: NemotronHForCausalLM(big, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)),
    }


@pytest.fixture(scope="module", name="models")
def models_fixture():
    return _abstract_models()


def _named_params(model):
    """[(path, logical names, shape)] of every parameter."""
    return [("/".join(map(str, path)), logical_names(v), v.shape)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def test_every_parameter_has_logical_names_covered_by_the_table(models):
    for model_name, model in models.items():
        for path, names, shape in _named_params(model):
            assert names is not None and len(names) == len(shape), (model_name, path, names, shape)
            missing = [n for n in names if n is not None and n not in LOGICAL_RULES]
            assert not missing, f"{model_name} {path}: logical axes {missing} missing from LOGICAL_RULES"
    # Flax's own reader sees the same metadata: nnx.get_partition_spec gives the logical spec.
    lm = models["tiny_lm"]
    assert nnx.get_partition_spec(nnx.state(lm))["embed"].get_value() == P("vocab", "embed")
    assert logical_specs(nnx.state(lm))["lm_head"] == P("embed", "vocab")


def test_optimizer_state_follows_its_parameters(models):
    # nnx.Optimizer copies each Param's metadata to its moments, so the same table lays them out.
    opt = nnx.eval_shape(lambda: nnx.Optimizer(NemotronHForCausalLM(tiny_config(), rngs=nnx.Rngs(0)),
                                                optax.adamw(1e-3), wrt=nnx.Param))
    specs = logical_specs(nnx.state(opt))
    params = logical_specs(nnx.state(models["tiny_lm"], nnx.Param))
    assert specs["opt_state"][0]["mu"] == params and specs["opt_state"][0]["nu"] == params
    assert specs["opt_state"][0]["count"] == P() and specs["step"] == P()


def test_an_unknown_logical_name_is_an_error_naming_the_parameter(models):
    rules = {k: v for k, v in LOGICAL_RULES.items() if k != "mlp"}
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    with pytest.raises(KeyError, match=r"layers/\d+/mixer/(up|down).*'mlp'"):
        param_shardings(models["tiny_lm"], mesh, rules)


def test_the_12b_lm_shards_every_named_dimension_on_64_devices(models):
    # fsdp 8 x tensor 8: every rule applies without the divisibility fallback, so
    # each matrix is split 64 ways (vectors and conv taps 8 ways).
    mesh_shape = {"data": 1, "fsdp": 8, "tensor": 8}
    total = per_device = 0
    for path, names, shape in _named_params(models["12b_lm"]):
        spec = mesh_spec(names, shape, mesh_shape)
        padded = tuple(spec) + (None,) * (len(shape) - len(spec))
        for name, axes in zip(names, padded):
            want = LOGICAL_RULES.get(name) if name else None
            assert axes == want, (path, names, shape, spec)
        split = math.prod(mesh_shape[a] for a in jax.tree.leaves(tuple(spec)))
        if sum(LOGICAL_RULES[n] is not None for n in names if n) == 2:  # matrices; not conv taps
            assert split == 64, (path, spec)
        total += math.prod(shape)
        per_device += math.prod(shape) // split
    assert per_device < 1.01 * total / 64, (per_device, total)  # ~12.3e9 / 64 = 192M parameters per device


def test_mesh_spec_falls_back_to_replication_rather_than_failing():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 4}
    assert mesh_spec(("embed", "vocab"), (32, 64), mesh_shape) == P("fsdp", "tensor")
    assert mesh_spec(("embed", "vocab"), (32, 262), mesh_shape) == P("fsdp")  # 4 does not divide 262
    assert mesh_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh_shape) == P("fsdp")  # 2 KV heads, tensor 4
    assert mesh_spec(("batch", "seq"), (8, 5), mesh_shape) == P(("data", "fsdp"))
    assert mesh_spec(("batch",), (2,), mesh_shape) == P("data")  # data x fsdp = 4 does not divide 2 rows
    # A mesh axis serves one dimension: the residual stream keeps fsdp on the batch.
    assert mesh_spec(("batch", "seq", "embed"), (8, 5, 32), mesh_shape) == P(("data", "fsdp"))
    assert mesh_spec(("batch", "seq", "embed"), (2, 5, 32), mesh_shape) == P("data", None, "fsdp")
    # Axes the mesh lacks are skipped (e.g. the pipeline's 1-D "data" mesh).
    assert mesh_spec(("batch", "embed"), (8, 32), {"data": 8}) == P("data")
    with pytest.raises(ValueError, match="do not match"):
        mesh_spec(("embed",), (4, 4), mesh_shape)


def test_mesh_config_sizes_and_validation():
    assert MeshConfig(data=2, fsdp=2, tensor=2).sizes(8) == (2, 2, 1, 2)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).sizes(16) == (2, 4, 1, 2)
    assert MeshConfig(data=-1, fsdp=1, tensor=1).sizes(8) == (8, 1, 1, 1)
    assert MeshConfig().sizes(8) == (1, 8, 1, 1)
    assert MeshConfig(data=2, fsdp=1, sequence=-1, tensor=2).sizes(16) == (2, 1, 4, 2)
    with pytest.raises(ValueError, match=r"mesh\.fsdp and mesh\.tensor are all -1.*8 devices"):
        MeshConfig(data=1, fsdp=-1, tensor=-1).sizes(8)
    with pytest.raises(ValueError, match=r"mesh\.fsdp=-1: 8 devices are not a multiple of mesh\.data=3"):
        MeshConfig(data=3, fsdp=-1, tensor=1).sizes(8)
    with pytest.raises(ValueError, match=r"= 4 devices, but there are 8"):
        MeshConfig(data=2, fsdp=2, tensor=1).sizes(8)
    with pytest.raises(ValueError, match=r"mesh\.tensor=0: must be a positive integer or -1.*8 devices"):
        MeshConfig(data=1, fsdp=-1, tensor=0).sizes(8)
    with pytest.raises(ValueError, match=r"mesh\.data=2\.5"):
        MeshConfig(data=2.5, fsdp=-1, tensor=1).sizes(8)
    # From an ml_collections-style config (attributes), on this process's devices; a config
    # written before the sequence axis existed gets sequence 1.
    cfg = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    mesh = make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor") and mesh.shape["fsdp"] == jax.device_count()
    assert mesh.shape["sequence"] == 1
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


# Runs with 8 fake CPU devices.
SHARDED = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from hybridvlm.vlm import NemotronHVLModel
    from tests.test_sharding import small_vlm_config
    from train.mesh import MeshConfig, make_mesh
    from hybridvlm.sharding import (batch_sharding, init_sharded, logical_constraint, logical_sharding,
                                param_shardings, shard_model)
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = small_vlm_config()
    build = lambda: NemotronHVLModel(cfg, rngs=nnx.Rngs(0))
    model = init_sharded(build, mesh)
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh)

    # Every array is already in its rule-table layout.
    for (path, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        assert v.get_value().sharding.is_equivalent_to(s, v.ndim), (path, v.get_value().sharding, s)

    # Large weights split along their model-parallel axis ("tensor") and width ("fsdp").
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    lm, vit = "language_model/layers/", "vision/blocks/0/"
    expect = {  # path: (spec, shard shape on each device)
        lm + "2/mixer/q": (P("fsdp", "tensor"), (16, 2, 8)),     # (embed 32, q_heads 4, head_dim 8)
        lm + "2/mixer/k": (P("fsdp", "tensor"), (16, 1, 8)),     # kv_heads 2
        lm + "2/mixer/v": (P("fsdp", "tensor"), (16, 1, 8)),
        lm + "2/mixer/o": (P("tensor", None, "fsdp"), (2, 8, 16)),
        lm + "1/mixer/up": (P("fsdp", "tensor"), (16, 32)),      # (embed 32, mlp 64)
        lm + "1/mixer/down": (P("tensor", "fsdp"), (32, 16)),
        # Mamba parts (inner 32 = 4 heads x 8, 2 groups x state 8): each split within itself.
        lm + "0/mixer/z_proj": (P("fsdp", "tensor"), (16, 16)),   # (embed 32, mamba_inner 32)
        lm + "0/mixer/x_proj": (P("fsdp", "tensor"), (16, 16)),
        lm + "0/mixer/B_proj": (P("fsdp", "tensor"), (16, 1, 8)),  # (embed, mamba_groups 2, mamba_state 8)
        lm + "0/mixer/C_proj": (P("fsdp", "tensor"), (16, 1, 8)),
        lm + "0/mixer/dt_proj": (P("fsdp", "tensor"), (16, 2)),   # (embed, mamba_heads 4)
        lm + "0/mixer/out_proj": (P("tensor", "fsdp"), (16, 16)),
        lm + "0/mixer/conv_x": (P(None, "tensor"), (4, 16)),      # (conv_kernel 4, mamba_inner 32)
        lm + "0/mixer/conv_B": (P(None, "tensor"), (4, 1, 8)),
        lm + "0/mixer/conv_x_bias": (P("tensor"), (16,)),
        lm + "0/mixer/A_log": (P("tensor"), (2,)),
        "language_model/embed": (P("tensor", "fsdp"), (32, 16)),  # (vocab 64, embed 32)
        "language_model/lm_head": (P("fsdp", "tensor"), (16, 32)),
        vit + "q/w": (P("fsdp", "tensor"), (16, 16)),             # (vit_embed 32, heads 2 x 16)
        vit + "k/w": (P("fsdp", "tensor"), (16, 16)),
        vit + "v/w": (P("fsdp", "tensor"), (16, 16)),
        vit + "o/w": (P("tensor", "fsdp"), (16, 16)),
        vit + "fc1/w": (P("fsdp", "tensor"), (16, 32)),
        "projector/linear_1": (P("fsdp", "tensor"), (64, 32)),   # (vit_merged 128, proj_hidden 64)
    }
    for path, (spec, shard) in expect.items():
        x = flat[path]
        assert x.sharding.spec == spec, (path, x.sharding.spec)
        shapes = {s.data.shape for s in x.addressable_shards}
        assert shapes == {shard}, (path, x.shape, shapes)
        assert len(x.addressable_shards) == 8

    # shard_model: an unsharded model placed onto the same layout.
    host = jax.device_get(state)
    plain = nnx.merge(graphdef, jax.device_put(host, jax.devices()[0]))
    placed = shard_model(nnx.merge(graphdef, jax.device_put(host, jax.devices()[0])), mesh)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(placed)), nnx.to_flat_state(state)):
        assert a.get_value().sharding.is_equivalent_to(b.get_value().sharding, a.ndim), path
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))

    # Forward: 4 rows, each a 2-frame video (one tubelet of 4 tokens) in 16 tokens.
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 60, (4, 16)).astype(np.int32)
    ids[:, 3:7] = cfg.image_token_id
    pixels = rng.standard_normal((4, 1, 6, 64, 64)).astype(np.float32)
    fwd = lambda state, ids, px: nnx.merge(graphdef, state)(ids, pixel_values_videos=px)
    want = jax.jit(fwd)(nnx.state(plain), ids, pixels)
    logits_sharding = logical_sharding(("batch", "seq", "vocab"), want.shape, mesh)
    assert logits_sharding.spec == P(("data", "fsdp"), None, "tensor")
    sharded_fwd = jax.jit(fwd, in_shardings=(shardings, batch_sharding(mesh), batch_sharding(mesh)),
                          out_shardings=logits_sharding)
    got = sharded_fwd(state, jax.device_put(ids, batch_sharding(mesh)), jax.device_put(pixels, batch_sharding(mesh)))
    assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
    assert {s.data.shape for s in got.addressable_shards} == {(1, 16, 32)}
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)

    # Activation constraints: by the ambient mesh inside jit, a no-op without one.
    h = jnp.ones((4, 16, 32))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda h: logical_constraint(h * 2, ("batch", "seq", "embed")))(h)
    assert out.sharding.spec == P(("data", "fsdp")), out.sharding
    out = jax.jit(lambda h: logical_constraint(h * 2, ("batch", "seq", "embed"), mesh))(h)
    assert out.sharding.spec == P(("data", "fsdp")), out.sharding
    assert logical_constraint(h, ("batch", "seq", "embed")) is h
    print("sharded ok")
""")


def test_sharded_layout_and_forward_on_8_devices():
    # Unoptimised XLA CPU codegen: compiling the init (one threefry per parameter) drops from
    # ~28 s to ~10 s on 2 cores; both sides of the logits comparison run under it.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sharded ok" in proc.stdout
