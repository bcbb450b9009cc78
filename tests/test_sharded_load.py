"""Loading onto a device mesh (`from_pretrained(..., mesh=)`) and the Mamba parts' sharding.

In a subprocess with 8 fake CPU devices (data 2 x fsdp 2 x tensor 2), as
tests/test_sharding.py: HF checkpoints (LM: single file and sharded; VLM)
and a hybridvlm Orbax checkpoint load straight into the rule table's
layout, with the unsharded load's values (and the LM's logits). On the hybrid_g2
fixture (8 Mamba heads of 8 channels in 2 B/C groups) each device holds
whole heads of every Mamba part, and the B/C group of those heads: the
tensor axis splits each part of HF's fused in_proj ([z | x | B | C | dt])
and conv ([x | B | C]) within the part (the fused layout cut across them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from safetensors.numpy import load_file
    import hybridvlm
    from hybridvlm import checkpoint
    from hybridvlm.sharding import param_shardings
    from train.mesh import MeshConfig, make_mesh
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    LM, VLM = "tests/fixtures/nemotron_h/", "tests/fixtures/vlm/"

    def flat(model):
        return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}

    def check(sharded, plain):
        # Every parameter on its rule-table shards, with the unsharded load's values.
        state = nnx.state(sharded)
        want = dict(nnx.to_flat_state(param_shardings(state, mesh)))
        a, b = flat(sharded), flat(plain)
        assert a.keys() == b.keys()
        for path, v in nnx.to_flat_state(state):
            x = v.get_value()
            assert x.sharding.is_equivalent_to(want[path], x.ndim), (path, x.sharding, want[path])
            key = "/".join(map(str, path))
            np.testing.assert_array_equal(np.asarray(x), np.asarray(b[key]), err_msg=key)

    def logits(model, *args, **kw):
        graphdef, state = nnx.split(model)
        return np.asarray(jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kw))(state, *args))

    ids = jnp.asarray(np.arange(3, 27, dtype=np.int32)[None])
    plain, sharded = hybridvlm.from_pretrained(LM + "hybrid_g2"), hybridvlm.from_pretrained(LM + "hybrid_g2", mesh=mesh)
    check(sharded, plain)
    np.testing.assert_allclose(logits(sharded, ids), logits(plain, ids), rtol=0, atol=2e-5)
    g1 = hybridvlm.from_pretrained(LM + "tied_g1_sharded", mesh=mesh)  # a sharded safetensors set, biases
    check(g1, hybridvlm.from_pretrained(LM + "tied_g1_sharded"))

    # Each Mamba part is split within itself: the device at tensor index j holds heads
    # [4j, 4j + 4) of z, x, dt (and conv_x, A_log, norm, out_proj) and B/C group j
    # (the group of those heads), i.e. columns of each part of HF's fused tensors.
    mixer = sharded.layers[0].mixer
    hf = load_file(LM + "hybrid_g2/model.safetensors")
    in_proj = hf["backbone.layers.0.mixer.in_proj.weight"].T      # (64, [z 64 | x 64 | B 32 | C 32 | dt 8])
    conv = hf["backbone.layers.0.mixer.conv1d.weight"][:, 0].T    # (4, [x 64 | B 32 | C 32])
    parts = {  # name: (tensor-sharded dim, channels per unit of that dim, HF columns of the part)
        "z_proj": (1, 8, in_proj[:, :64]), "x_proj": (1, 8, in_proj[:, 64:128]),
        "B_proj": (1, 1, in_proj[:, 128:160].reshape(64, 2, 16)),
        "C_proj": (1, 1, in_proj[:, 160:192].reshape(64, 2, 16)), "dt_proj": (1, 1, in_proj[:, 192:]),
        "conv_x": (1, 8, conv[:, :64]), "conv_B": (1, 1, conv[:, 64:96].reshape(4, 2, 16)),
        "conv_C": (1, 1, conv[:, 96:].reshape(4, 2, 16)), "A_log": (0, 1, None), "out_proj": (0, 8, None),
    }
    axis = mesh.axis_names.index("tensor")
    tensor_of = {d.id: index[axis] for index, d in np.ndenumerate(mesh.devices)}
    for name, (dim, unit, columns) in parts.items():
        x = getattr(mixer, name)[...]
        assert x.sharding.spec[dim] == "tensor", (name, x.sharding.spec)
        heads = 4 if name in ("z_proj", "x_proj", "dt_proj", "conv_x", "A_log", "out_proj") else 1
        for shard in x.addressable_shards:
            j, cut = tensor_of[shard.device.id], shard.index[dim]
            assert (cut.start or 0, cut.stop) == (j * heads * unit, (j + 1) * heads * unit), (name, shard.index)
            if columns is not None:
                np.testing.assert_array_equal(np.asarray(shard.data), columns[shard.index], err_msg=name)
    # n_groups = 1: the groups dimension cannot split, so B/C replicate over tensor.
    g1 = g1.layers[0].mixer
    assert g1.B_proj[...].sharding.spec == P("fsdp"), g1.B_proj[...].sharding.spec
    assert g1.x_proj[...].sharding.spec == P("fsdp", "tensor")

    # VLM (RADIO tower + projector + LM): the unsharded load's values on the rule table's shards
    # (a sharded VLM forward equals the unsharded one: tests/test_sharding.py).
    check(hybridvlm.from_pretrained(VLM + "omni_video", mesh=mesh), hybridvlm.from_pretrained(VLM + "omni_video"))

    # A hybridvlm (Orbax) checkpoint restores onto the shards too.
    out = tempfile.mkdtemp() + "/ckpt"
    plain = hybridvlm.from_pretrained(LM + "hybrid_g2")
    checkpoint.save(plain, out)
    check(hybridvlm.from_pretrained(out, mesh=mesh), plain)
    print("sharded load ok")
""")


def test_hf_and_orbax_checkpoints_load_onto_8_devices_with_mamba_parts_split_within_themselves():
    # Unoptimised XLA CPU codegen, as tests/test_sharding.py: compiles dominate here.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sharded load ok" in proc.stdout
