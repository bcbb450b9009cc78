"""train/aot.py: the ahead-of-time fit check's command line, on a small VLM and 8 fake CPU devices.

One compile (a two-layer LM and a one-block tower, given as a config file through
`--model`) checks the report and its accounting: the parameter bytes per device equal
the per-device shard sizes computed here from the parameter shapes and the rule table,
the optimizer holds two moments of them, and the other arguments are the batch's shard.
The usage errors stop before JAX starts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from flax import nnx

from hybridvlm.config import LMConfig
from hybridvlm.radio import RadioConfig
from hybridvlm.sharding import logical_names, mesh_spec
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = dict(
    text=dict(vocab_size=64, hidden_size=64, pattern="*-", intermediate_size=128, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16),
    vision=dict(hidden_size=32, num_layers=1, num_heads=2, patch_size=16, max_img_size=64, mlp_ratio=2.0,
                num_cls_tokens=1, num_registers=1, video_temporal_patch_size=2),
    image_token_id=5, projector_hidden_size=64, image_size=64,
)
CONFIG_FILE = textwrap.dedent(f"""
    import ml_collections

    def get_config():
        c = ml_collections.ConfigDict()
        c.model = {MODEL!r}
        return c
""")
MESH = dict(data=1, fsdp=4, sequence=1, tensor=2)
SMALL = ["--devices", "8", "--mesh.fsdp=4", "--mesh.tensor=2", "--frames", "4", "--text_tokens", "16",
         "--frame_text_tokens", "4"]


def run_aot(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "train.aot", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, TMPDIR=str(tmp_path)), timeout=600)


def per_device_param_bytes() -> int:
    """Float32 bytes of one device's parameter shards: each dimension divided by the mesh axes
    the rule table puts it on (nothing compiled, no devices needed)."""
    cfg = VLMConfig(text=LMConfig(**MODEL["text"]), vision=RadioConfig(**MODEL["vision"]),
                    **{k: v for k, v in MODEL.items() if k not in ("text", "vision")})
    params = nnx.state(nnx.eval_shape(lambda: NemotronHVLModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    total = 0
    for _, var in nnx.to_flat_state(params):
        names = logical_names(var) or (None,) * len(var.shape)
        spec = tuple(mesh_spec(names, var.shape, MESH)) + (None,) * len(var.shape)
        shard = []
        for dim, axes in zip(var.shape, spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            split = math.prod(MESH[a] for a in axes)
            assert dim % split == 0
            shard.append(dim // split)
        total += math.prod(shard) * 4
    return total


def batch_bytes_per_device(rows: int = 1, length: int = 64, tubelets: int = 2, side: int = 64) -> int:
    """One data-parallel shard of the batch: input_ids, labels (int32), attention_mask, loss_mask
    (bool) of (rows, length), pixels (rows, tubelets, 6, side, side) float32, valid (rows,)."""
    return rows * (2 * 4 * length + 2 * length + tubelets * 6 * side * side * 4 + 1)


def test_small_model_on_8_devices_prints_the_table_and_writes_exact_parameter_bytes(tmp_path):
    model_file = tmp_path / "small_vlm.py"
    model_file.write_text(CONFIG_FILE)
    out = tmp_path / "aot.json"
    proc = run_aot(["--model", str(model_file), *SMALL, "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    for line in ("mesh data 1 x fsdp 4 x sequence 1 x tensor 2 = 8 fake CPU devices", "batch 4 rows x 64 tokens",
                 "plan: progressive-step at budget 0.250", "parameters (f32 masters)", "optimizer state (AdamW)",
                 "temporaries", "outputs", "vs 75 GiB usable of 80: fits"):
        assert line in text, text
    report = json.loads(out.read_text())
    b = report["bytes"]
    assert report["devices"] == 8 and report["mesh"] == MESH and report["tokens"] == 64
    assert b["parameters"] == per_device_param_bytes()
    # AdamW: two float32 moments per parameter, plus int32 step counters.
    assert 0 < b["optimizer"] - 2 * b["parameters"] <= 64
    # The rest of the arguments: the batch's shard, the step and the PRNG key.
    assert 0 < b["other_arguments"] - batch_bytes_per_device() <= 64
    assert b["arguments"] == b["parameters"] + b["optimizer"] + b["other_arguments"]
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["aliased"]
    # The donated state comes back in place: every output but the metrics is aliased.
    assert b["aliased"] == b["arguments"] - batch_bytes_per_device() and report["fits"] is True
    assert report["machine"]["backend"] == "cpu" and report["machine"]["devices"] == 8


@pytest.mark.parametrize("mesh,message", [
    (["--mesh.fsdp=3", "--mesh.tensor=2"], "--mesh.data=1 x mesh.fsdp=3 x mesh.sequence=1 x mesh.tensor=2 = 6 "
                                          "devices, but there are 8"),
    (["--mesh.fsdp=-1", "--mesh.tensor=3"], "--mesh.fsdp=-1: 8 devices are not a multiple of mesh.data=1, "
                                           "mesh.sequence=1, mesh.tensor=3"),
    # A 64-token multiple of a row does not split into 3 sequence shards.
    (["--devices", "6", "--mesh.fsdp=1", "--mesh.sequence=3", "--mesh.tensor=2", "--frames", "4", "--text_tokens",
      "16", "--frame_text_tokens", "4"], "--mesh.sequence: a "),
])
def test_a_mesh_that_does_not_match_the_devices_is_a_one_line_usage_error(mesh, message, tmp_path):
    proc = run_aot(["--model", "tiny", "--devices", "8", *mesh] if "--devices" not in mesh else
                   ["--model", "tiny", *mesh], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_a_sequence_split_step_compiles_and_names_its_mesh(tmp_path):
    # fsdp 2 x sequence 2 x tensor 2: the LM's forward and backward inside the context-parallel shard_map.
    model_file = tmp_path / "small_vlm.py"
    model_file.write_text(CONFIG_FILE)
    args = ["--model", str(model_file), "--devices", "8", "--mesh.fsdp=2", "--mesh.sequence=2", "--mesh.tensor=2",
            "--frames", "4", "--text_tokens", "16", "--frame_text_tokens", "4"]
    proc = run_aot(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "mesh data 1 x fsdp 2 x sequence 2 x tensor 2 = 8 fake CPU devices" in proc.stdout, proc.stdout
    assert "fits" in proc.stdout
