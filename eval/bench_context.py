"""Context parallelism at 12B scale: per-device memory of the sequence-split prefill (compiled, never run).

    python -m eval.bench_context                                  # 128 / 512 / 2048 frames, degrees 1 / 4 / 16 / 64
    python -m eval.bench_context --frames 512 --degrees 1,16 --json out.json
    python -m eval.bench_context --runlocal                       # small widths and prompt: seconds

For each (frames, degree P) the bf16 prefill of the 12B LM (`configs/nemotron_h_12b.py`,
batch 1, frames x `tokens_per_frame` visual tokens + `text` text tokens, left-padded to a
multiple of P) is lowered and compiled for a mesh of P fake CPU devices along a "sequence"
axis: P = 1 is the ordinary `lm.prefill`, P > 1 `hybridvlm.context.context_parallel_prefill`
(each device one contiguous block; weights replicated, as with no other mesh axis). The
model is abstract (`nnx.eval_shape`): nothing is allocated. The table shows XLA's
`memory_analysis()` of one device's program: parameters, temporaries, outputs (the device's
share of the KV caches and Mamba states), their total. These are the CPU compiler's
numbers, an estimate of a TPU's or GPU's (see `eval.bench_memory`'s notes); on a TPU slice
the same command compiles for the real chips (`--fake_devices=false`).

Communicated bytes per layer and device are counted from the algorithm (what each device
receives), not measured:
  Mamba-2:   the conv halo, (k - 1) x conv_dim activations from the previous shard, plus the
             all-gather of every shard's (log-decay, final state): (P - 1) x h x (1 + p x n) float32;
  attention: ring attention passes every key/value block round the ring: (P - 1) x (t / P)
             x kv_heads x head_dim x 2 (k and v) activations;
  MLP:       nothing.

`--wall` adds a correctness run on this machine: a small hybrid LM's prefill on 1 device and
on 8 fake devices (`sequence` 8), wall time of each and the largest logits difference (fake
devices share the host's cores, so this is not a speed claim).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import AxisType

from configs import nemotron_h_12b
from eval.bench_memory import GiB, RUNLOCAL_MODEL, lm_config, machine_info
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.context.prefill import SEQUENCE_AXIS, context_parallel_prefill
from hybridvlm.lm import NemotronHForCausalLM

ACT_BYTES = 2  # bfloat16 activations
# --runlocal: the small model of eval.bench_memory, a short prompt, 2 and 4 shards.
RUNLOCAL = dict(layers=9, frames=[4, 8], tokens_per_frame=64, text=16, degrees=[1, 2, 4])
# --wall: a tiny hybrid LM (every layer kind) and a 1024-token prompt, 1 vs 8 devices.
WALL_MODEL = dict(RUNLOCAL_MODEL, pattern="M*-M*-", seq_block=0)
WALL_TOKENS, WALL_DEVICES = 1024, 8


def define_flags() -> None:
    """Registers the CLI flags; called under __main__ only (the eval modules share flag names)."""
    flags.DEFINE_list("frames", ["128", "512", "2048"], "Video frames of each point.")
    flags.DEFINE_list("degrees", ["1", "4", "16", "64"], "Sequence-parallel degrees (devices on the axis).")
    flags.DEFINE_integer("tokens_per_frame", 256, "Visual tokens per frame.")
    flags.DEFINE_integer("text", 128, "Text tokens after the video.")
    flags.DEFINE_integer("layers", None, "Only the first N layers of the 12B pattern (default: all 62).")
    flags.DEFINE_bool("runlocal", False, f"Small widths, {RUNLOCAL['layers']} layers, a short prompt, "
                                         f"degrees {RUNLOCAL['degrees']}.")
    flags.DEFINE_bool("wall", True, f"Also time a small LM's prefill on 1 vs {WALL_DEVICES} fake devices.")
    flags.DEFINE_bool("fake_devices", True, "Fake CPU devices (as many as the largest degree); false: the "
                                            "machine's own devices (a TPU slice).")
    flags.DEFINE_string("json", None, "Write the rows, the config and machine info as JSON here.")


def prompt_length(frames: int, tokens_per_frame: int, text: int, degree: int) -> int:
    """Tokens of the prompt, rounded up to a multiple of `degree` (left padding)."""
    t = frames * tokens_per_frame + text
    return -(-t // degree) * degree


def comm_bytes(cfg: LMConfig, t: int, degree: int) -> dict[str, int]:
    """Bytes one device receives per layer of each kind (module doc), batch 1."""
    if degree == 1:
        return dict(mamba=0, attention=0, mlp=0)
    halo = (cfg.conv_kernel - 1) * cfg.conv_dim * ACT_BYTES
    states = (degree - 1) * cfg.mamba_num_heads * (1 + cfg.mamba_head_dim * cfg.ssm_state_size) * 4
    kv = (degree - 1) * (t // degree) * cfg.num_key_value_heads * cfg.head_dim * 2 * ACT_BYTES
    return dict(mamba=halo + states, attention=kv, mlp=0)


def analyse(cfg: LMConfig, *, frames: int, tokens_per_frame: int, text: int, degree: int, devices) -> dict:
    """Compiles the bf16 prefill for `degree` devices abstractly; one row (GiB, bytes per layer)."""
    model = nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    t = prompt_length(frames, tokens_per_frame, text, degree)
    if degree == 1:
        def prefill(state, ids, mask):
            return nnx.merge(graphdef, state).prefill(ids, mask, t)
    else:
        mesh = jax.make_mesh((degree,), (SEQUENCE_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:degree])

        def prefill(state, ids, mask):
            return context_parallel_prefill(nnx.merge(graphdef, state), ids, mask, t, mesh=mesh)

    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    t0 = time.perf_counter()
    mem = jax.jit(prefill).lower(state, ids, mask).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    params = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)) / GiB
    temp, out = mem.temp_size_in_bytes / GiB, mem.output_size_in_bytes / GiB
    return dict(frames=frames, tokens=t, degree=degree, local_tokens=t // degree, params_gib=params,
                temp_gib=temp, output_gib=out, total_gib=params + temp + out,
                comm_bytes_per_layer=comm_bytes(cfg, t, degree), compile_seconds=compile_s)


def wall_run(devices) -> dict:
    """A small LM's prefill on 1 device and on WALL_DEVICES along "sequence": seconds and logits error."""
    cfg = LMConfig(**dict(lm_config(runlocal=True).to_dict(), **WALL_MODEL))
    lm = NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (1, WALL_TOKENS), 3, cfg.vocab_size)
    mask = jnp.ones((1, WALL_TOKENS), bool)
    mesh = jax.make_mesh((WALL_DEVICES,), (SEQUENCE_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices[:WALL_DEVICES])
    one = jax.jit(lambda i, m: lm.prefill(i, m, WALL_TOKENS)[0])
    split = jax.jit(lambda i, m: context_parallel_prefill(lm, i, m, WALL_TOKENS, mesh=mesh)[0])
    out = {}
    for name, fn in (("one_device", one), ("sequence8", split)):
        logits = jax.block_until_ready(fn(ids, mask))  # compile and warm up
        t0 = time.perf_counter()
        jax.block_until_ready(fn(ids, mask))
        out[name] = dict(seconds=time.perf_counter() - t0, logits=np.asarray(logits))
    err = float(np.max(np.abs(out["one_device"]["logits"] - out["sequence8"]["logits"])))
    return dict(tokens=WALL_TOKENS, pattern=cfg.pattern, hidden=cfg.hidden_size,
                one_device_seconds=out["one_device"]["seconds"], sequence8_seconds=out["sequence8"]["seconds"],
                max_abs_logits_diff=err)


def _ints(values, name: str) -> list[int]:
    out = []
    for v in values:
        try:
            out.append(cli_checks.at_least(f"--{name}", int(v), 1))
        except ValueError:
            raise cli.UsageError(f"--{name}: {v!r} is not an integer") from None
    cli_checks.require(bool(out), f"--{name}", "needs at least one value")
    return out


HEADER = (f"{'frames':>6}{'tokens':>9}{'P':>4}{'local':>8}{'params':>8}{'temp':>8}{'out':>8}{'total':>8}"
          f"{'Mamba MB':>10}{'attn MB':>9}{'compile':>9}")


def format_row(r, unit: str) -> str:
    scale = 1024 if unit == "MiB" else 1
    size = lambda key: f"{r[key] * scale:>8.2f}"
    c = r["comm_bytes_per_layer"]
    return (f"{r['frames']:>6}{r['tokens']:>9}{r['degree']:>4}{r['local_tokens']:>8}{size('params_gib')}"
            f"{size('temp_gib')}{size('output_gib')}{size('total_gib')}{c['mamba'] / 1e6:>10.3f}"
            f"{c['attention'] / 1e6:>9.1f}{r['compile_seconds']:>8.1f}s")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    given = lambda name: not F[name].using_default_value
    frames, degrees = _ints(F.frames, "frames"), _ints(F.degrees, "degrees")
    tokens_per_frame, text, layers = F.tokens_per_frame, F.text, F.layers
    if F.runlocal:  # its own sizes unless given explicitly
        frames = frames if given("frames") else RUNLOCAL["frames"]
        degrees = degrees if given("degrees") else RUNLOCAL["degrees"]
        tokens_per_frame = tokens_per_frame if given("tokens_per_frame") else RUNLOCAL["tokens_per_frame"]
        text = text if given("text") else RUNLOCAL["text"]
        layers = layers if layers is not None else RUNLOCAL["layers"]
    cli_checks.at_least("--tokens_per_frame", tokens_per_frame, 1)
    cli_checks.at_least("--text", text, 1)
    if layers is not None:
        cli_checks.in_range("--layers", layers, 1, len(nemotron_h_12b.PATTERN))
    if F.json:
        cli_checks.output_file("--json", F.json)
    try:
        cfg = lm_config(layers=layers, runlocal=F.runlocal)
    except ConfigError as e:
        raise cli.UsageError(str(e)) from None
    for n in frames:
        for p in degrees:
            local = prompt_length(n, tokens_per_frame, text, p) // p
            cli_checks.require(local >= cfg.conv_kernel - 1, "--degrees",
                               f"{p} shards of a {n}-frame prompt hold {local} tokens each, fewer than the "
                               f"Mamba conv's {cfg.conv_kernel - 1}-token halo")
    needed = max(degrees + ([WALL_DEVICES] if F.wall else []))
    if F.fake_devices:  # before JAX's backend starts
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", needed)
    devices = jax.devices()
    cli_checks.require(len(devices) >= needed, "--degrees",
                       f"needs {needed} devices, this machine has {len(devices)} (--fake_devices fakes them)")
    info = machine_info()
    unit = "MiB" if F.runlocal else "GiB"
    print(f"XLA memory analysis of one device's compiled bf16 prefill, the prompt split along a 'sequence' "
          f"axis of P devices (compile only, nothing allocated): the {info['backend'].upper()} compiler's")
    print(f"layers={cfg.num_layers} hidden={cfg.hidden_size} prompt=frames x {tokens_per_frame} + {text} text, "
          f"batch 1, weights replicated; sizes in {unit}; Mamba / attn MB: bytes one device receives per "
          f"layer of that kind (counted, see --help)")
    print(HEADER, flush=True)
    rows, t0 = [], time.perf_counter()
    for n in frames:
        for p in degrees:
            row = analyse(cfg, frames=n, tokens_per_frame=tokens_per_frame, text=text, degree=p, devices=devices)
            rows.append(row)
            print(format_row(row, unit), flush=True)
    wall = None
    if F.wall:
        wall = wall_run(devices)
        print(f"correctness run ({wall['pattern']}, hidden {wall['hidden']}, {wall['tokens']} tokens, float32) on "
              f"{info['cpu_count']} host cores: 1 device {wall['one_device_seconds'] * 1e3:.1f} ms, "
              f"{WALL_DEVICES} fake devices {wall['sequence8_seconds'] * 1e3:.1f} ms (not a speed claim: they "
              f"share the cores); max |logits difference| {wall['max_abs_logits_diff']:.2e}")
    seconds = time.perf_counter() - t0
    print(f"wall time {seconds:.1f}s")
    if F.json:
        atomic.write_json(F.json, dict(machine=info, config=cfg.to_dict(), tokens_per_frame=tokens_per_frame,
                                       text=text, analysis=f"XLA {info['backend']} compiler memory_analysis()",
                                       wall_seconds=seconds, rows=rows, correctness_run=wall), default=float)


if __name__ == "__main__":
    cli.run(main, define_flags)
