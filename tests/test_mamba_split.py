"""The Mamba mixer's input projection and conv stored per part (hybridvlm/layers/mamba2.py).

HF's fused tensors split into the parts and fuse back exactly; each part
carries its own logical names; a format-1 hybridvlm checkpoint (written
before the split, with fused `in_proj` / `conv_weight`) still loads, split
on the fly. The sharding of the parts on a mesh is tested in
tests/test_sharded_load.py and tests/test_sharding.py.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import hybridvlm
from hybridvlm import checkpoint
from hybridvlm.layers.mamba2 import CONV_PARTS, PROJ_PARTS, fuse_conv, fuse_in_proj, split_conv, split_in_proj
from hybridvlm.sharding import logical_names, mesh_spec
from tests.conftest import tiny_config

TIED_G1 = os.path.join(os.path.dirname(__file__), "fixtures", "nemotron_h", "tied_g1_sharded")


def test_split_and_fuse_are_inverse_and_name_each_part():
    cfg = tiny_config()  # inner 32 (4 heads x 8), 2 groups x state 8
    proj = np.arange(7 * (32 + 32 + 2 * 16 + 4)).reshape(7, -1)
    parts = split_in_proj(proj, cfg)
    assert {k: v.shape for k, v in parts.items()} == {"z": (7, 32), "x": (7, 32), "B": (7, 2, 8), "C": (7, 2, 8),
                                                      "dt": (7, 4)}
    np.testing.assert_array_equal(parts["B"][:, 1], proj[:, 64 + 8:64 + 16])  # group 1 of B
    np.testing.assert_array_equal(fuse_in_proj(parts), proj)
    conv = np.arange(4 * 64).reshape(4, 64)
    np.testing.assert_array_equal(fuse_conv(split_conv(conv, cfg)), conv)
    assert split_in_proj(proj, cfg, only=("dt",)).keys() == {"dt"}
    with pytest.raises(ValueError, match="config implies 100"):
        split_in_proj(proj[:, :-1], cfg)

    mixer = nnx.eval_shape(lambda: hybridvlm.NemotronHForCausalLM(tiny_config(use_bias=True), rngs=nnx.Rngs(0)))
    mixer = mixer.layers[0].mixer
    names = {n: logical_names(getattr(mixer, n)) for n in
             [f"{p}_proj" for p in PROJ_PARTS] + [f"conv_{p}" for p in CONV_PARTS] + ["B_proj_bias", "conv_C_bias"]}
    assert names == {
        "z_proj": ("embed", "mamba_inner"), "x_proj": ("embed", "mamba_inner"),
        "B_proj": ("embed", "mamba_groups", "mamba_state"), "C_proj": ("embed", "mamba_groups", "mamba_state"),
        "dt_proj": ("embed", "mamba_heads"), "conv_x": ("conv_kernel", "mamba_inner"),
        "conv_B": ("conv_kernel", "mamba_groups", "mamba_state"),
        "conv_C": ("conv_kernel", "mamba_groups", "mamba_state"), "B_proj_bias": ("mamba_groups", "mamba_state"),
        "conv_C_bias": ("mamba_groups", "mamba_state")}
    # tensor = 2 splits every part within itself; one B/C group cannot split, so it replicates.
    mesh = {"tensor": 2}
    assert mesh_spec(names["B_proj"], (32, 2, 8), mesh) == jax.sharding.PartitionSpec(None, "tensor")
    assert mesh_spec(names["B_proj"], (32, 1, 16), mesh) == jax.sharding.PartitionSpec()


def test_a_format_1_checkpoint_with_fused_mamba_weights_loads_split(tmp_path):
    model = hybridvlm.from_pretrained(TIED_G1)  # Mamba in_proj and conv biases
    cfg = model.config
    fused = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for i, kind in enumerate(cfg.pattern):
        if kind != "M":
            continue
        mixer = fused["layers"][i]["mixer"]
        for name, key, parts, fuse in (("in_proj", "{}_proj", PROJ_PARTS, fuse_in_proj),
                                       ("in_proj_bias", "{}_proj_bias", PROJ_PARTS, fuse_in_proj),
                                       ("conv_weight", "conv_{}", CONV_PARTS, fuse_conv),
                                       ("conv_bias", "conv_{}_bias", CONV_PARTS, fuse_conv)):
            mixer[name] = fuse({p: np.asarray(mixer.pop(key.format(p))) for p in parts})
    directory = tmp_path / "old"
    directory.mkdir()
    saver = ocp.StandardCheckpointer()
    saver.save(str(directory / checkpoint.PARAMS_DIR), fused)
    saver.wait_until_finished()
    meta = {"format": 1, "model": "NemotronHForCausalLM", "dtype": "float32", "config": cfg.to_dict()}
    (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    back = hybridvlm.from_pretrained(str(directory))
    want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(want[path].get_value()),
                                      err_msg=str(path))
    meta["format"] = 0
    (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(hybridvlm.CheckpointError, match="unsupported format 0"):
        hybridvlm.from_pretrained(str(directory))
