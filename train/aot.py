"""Ahead-of-time fit check: per-device memory of one compiled train step, on fake CPU devices.

    python -m train.aot                                       # 12B VLM, 64 devices: fsdp 8 x tensor 8
    python -m train.aot --devices 64 --mesh.fsdp 16 --mesh.tensor 4
    python -m train.aot --frames 64 --budget 0                # 64 frames, no reduction plan
    python -m train.aot --model tiny --devices 8 --mesh.fsdp 4 --mesh.tensor 2 --json out.json

Lowers and compiles (never runs) ONE step of `train.step.make_train_step` for a mesh of
`--devices` fake CPU devices (`jax_num_cpu_devices`), laid out as finetuning lays it out
(`train.state.StateLayout`: parameters by the logical-axis rules, AdamW moments like
their parameters, batch rows over data x fsdp, the state donated): bfloat16 compute on
float32 master weights, per-layer remat, AdamW with global-norm clipping, answer-token
loss, under the paper's plan (`reduction.progressive(num_layers, num_visual, budget)`,
the low-to-high step schedule; `--budget 0`: no reduction). Everything is abstract:
`nnx.eval_shape` builds the model, `StateLayout.abstract` the train state and
`jax.ShapeDtypeStruct`s the batch, so no parameter of the model is ever allocated.

The batch is the input pipeline's for one frame bucket (`hybridvlm.data.pipeline`):
`--batch` rows (default one per data-parallel shard, data x fsdp) of `--frames` frames
(frames / 2 tubelets x the model's visual tokens per tubelet) plus the text the pipeline
budgets (`--frame_text_tokens` per frame, `--text_tokens` for the question), padded to
a multiple of 64.

The table is XLA's `memory_analysis()` of the compiled step, per device: its arguments,
split into parameters and optimizer state (from the abstract state's per-device shard
shapes) and the rest (batch, step, PRNG key); temporaries; outputs (the new state, aliased
to the donated one, and the metrics); and their total, arguments + temporaries + outputs -
aliased, against `--device_memory_gib` less `--headroom_gib` for the runtime.

The analysis is the compiler's of the backend it runs on: here always the CPU compiler's
(fake devices), which fuses and schedules differently from a GPU's or TPU's compiler, so
read it as an estimate, not a measurement. In particular the CPU compiler undoes remat: it
drops the optimisation barriers of `jax.checkpoint` and merges the recomputation with the
forward pass (a 16-layer toy: 125 dots lowered, 95 compiled, the same temporaries with and
without remat; the 12B cut to 8 LM layers: 17.79 vs 17.81 GiB), so `temporaries` is that of
a step that keeps every layer's activations: an upper bound for a compiler that honours
remat (GPU, TPU), and `--remat` barely changes it here. Models: `nano_vl_12b`
(`configs/nemotron_nano_vl_12b.py`), `tiny` (`configs/tiny_vlm.py`),
or a config file whose `model` field has the layout of `configs/finetune_synth.py`'s.
`--layers N` / `--vision_layers N` compile the first N layers only (see README: the
numbers then describe that cut model; the parameter and optimizer lines are also given
for the whole model, exactly, from its shapes).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from configs import nemotron_nano_vl_12b, tiny_vlm
from eval.inputs import tiny_vlm_config
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.data.pipeline_config import LENGTH_MULTIPLE
from hybridvlm.remat import REMAT_POLICIES
from hybridvlm.radio import RadioConfig
from hybridvlm.vlm import NemotronHVLModel, VLMConfig
from reduction.evs import evs_keep_count
from reduction.plan import SHAPES, progressive
from train.mesh import AXES, MeshConfig, make_mesh, sequence_split
from train.optim import PARTS, OptimConfig, make_optimizer
from train.state import StateLayout
from train.step import make_train_step

GiB = 2**30
MODELS = ("nano_vl_12b", "tiny")
# XLA options of the compile: the CPU code is never run, so LLVM need not optimise it.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Token ids the step scores multiple-choice accuracy over; they do not change the program's memory.
ANSWER_IDS = (10, 11, 12, 13)


def define_flags() -> None:
    """Registers the CLI flags (called by `cli.run`, not at import)."""
    flags.DEFINE_string("model", "nano_vl_12b", f"Model: {' or '.join(MODELS)}, or a config file (.py) "
                        "with a `model` field laid out as configs/finetune_synth.py's.")
    flags.DEFINE_integer("devices", 64, "Fake CPU devices of the mesh.")
    flags.DEFINE_integer("mesh.data", 1, "Mesh axis sizes (one may be -1: the rest of the devices).")
    flags.DEFINE_integer("mesh.fsdp", -1, "See --mesh.data.")
    flags.DEFINE_integer("mesh.sequence", 1, "See --mesh.data (> 1: context parallelism, the prompt split "
                                             "along the sequence for the LM's layers).")
    flags.DEFINE_integer("mesh.tensor", 8, "See --mesh.data.")
    flags.DEFINE_integer("frames", 128, "Frames per video (the frame bucket).")
    flags.DEFINE_integer("batch", None, "Global batch rows (default: one per data-parallel shard, data x fsdp).")
    flags.DEFINE_float("budget", 0.25, "Visual-token budget of the plan (0: no reduction).")
    flags.DEFINE_enum("shape", "step", SHAPES, "Progressive plan shape (step: the paper's).")
    flags.DEFINE_enum("remat", "full", REMAT_POLICIES, "Remat policy per LM layer and per vision tower block.")
    flags.DEFINE_list("freeze", [], f"Frozen parts (no gradients, no optimizer state), among {', '.join(PARTS)}.")
    flags.DEFINE_integer("accumulate", 1, "Micro-batches per step (gradient accumulation).")
    flags.DEFINE_integer("image_size", None, "Frame side in pixels (default: the model's).")
    flags.DEFINE_integer("frame_text_tokens", 40, "Text tokens per frame (its label, <img></img>).")
    flags.DEFINE_integer("text_tokens", 384, "Text tokens for BOS, the question and options.")
    flags.DEFINE_integer("layers", None, "Compile the first N LM layers only (default: all).")
    flags.DEFINE_integer("vision_layers", None, "Compile the first N vision-tower layers only (default: all).")
    flags.DEFINE_float("device_memory_gib", 80.0, "Memory of one device, GiB.")
    flags.DEFINE_float("headroom_gib", 5.0, "Memory left to the runtime (CUDA context, workspaces), GiB.")
    flags.DEFINE_bool("fast_compile", True, "Skip LLVM's optimisations of the generated CPU code (the program is "
                      "never run; XLA's buffer assignment, hence the analysis, does not depend on them).")
    flags.DEFINE_string("json", None, "Write the analysis, the setup and machine info as JSON here.")


# ----------------------------------------------------------------------------- model


def _load_config_file(path: str):
    spec = importlib.util.spec_from_file_location("_aot_model_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # noqa: BLE001 -- user code: any failure means the file cannot be used
        raise cli.InputError(f"--model: {path}: cannot load the config ({type(e).__name__}: {e})") from None


def vlm_config_from(model) -> VLMConfig:
    """A VLMConfig from a finetune-style `model` ConfigDict (text, vision and VLMConfig fields)."""
    model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    rest = {k: v for k, v in model.items() if k not in ("text", "vision")}
    return VLMConfig(text=LMConfig(**model["text"]), vision=RadioConfig(**model["vision"]), **rest)


def model_config(name: str) -> VLMConfig:
    """The VLMConfig of `--model`. UsageError / InputError name the flag."""
    try:
        if name == "nano_vl_12b":
            return vlm_config_from(nemotron_nano_vl_12b.get_config().model)
        if name == "tiny":
            return tiny_vlm_config(tiny_vlm.get_config())
        if name.endswith(".py"):
            cli_checks.input_file("--model", name)
            cfg = _load_config_file(name)
            if "model" not in cfg:
                raise cli.InputError(f"--model: {name}: its config has no `model` field")
            return vlm_config_from(cfg.model)
    except (ConfigError, TypeError, KeyError) as e:
        raise cli.UsageError(f"--model: {name}: {e}") from None
    raise cli.UsageError(f"--model: {name!r}: choose {' or '.join(MODELS)}, or give a config file (.py)")


def cut(cfg: VLMConfig, *, layers: int | None, vision_layers: int | None, image_size: int | None) -> VLMConfig:
    """The config with only the first `layers` LM / `vision_layers` tower layers, and frames of `image_size`."""
    text = cfg.text if layers is None else cfg.text.replace(pattern=cfg.text.pattern[:layers])
    vision = cfg.vision if vision_layers is None else dataclasses.replace(cfg.vision, num_layers=vision_layers)
    return dataclasses.replace(cfg, text=text, vision=vision,
                               image_size=cfg.image_size if image_size is None else image_size)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one compiled step is for (the row of the report, less the analysis)."""

    frames: int
    batch: int
    image_size: int
    frame_text_tokens: int = 40
    text_tokens: int = 384
    budget: float = 0.25
    shape: str = "step"
    remat: str = "full"
    freeze: tuple[str, ...] = ()
    accumulate: int = 1

    def tubelets(self, cfg: VLMConfig) -> int:
        return -(-self.frames // cfg.temporal_patch_size)

    def visual_tokens(self, cfg: VLMConfig) -> int:
        """Visual tokens (placeholders) per row."""
        return self.tubelets(cfg) * cfg.tokens_per_tubelet(self.image_size, self.image_size)

    def lm_visual_tokens(self, cfg: VLMConfig) -> int:
        """Visual tokens per row that reach the LM (after EVS, where the model has it)."""
        per = cfg.tokens_per_tubelet(self.image_size, self.image_size)
        rate = cfg.video_pruning_rate
        return evs_keep_count(self.tubelets(cfg), per, rate) if rate > 0 else self.visual_tokens(cfg)

    def row_length(self, cfg: VLMConfig) -> int:
        """Tokens per row, as the pipeline budgets them (`PipelineConfig.row_length`)."""
        n = self.visual_tokens(cfg) + self.frames * self.frame_text_tokens + self.text_tokens
        return -(-n // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


def abstract_batch(cfg: VLMConfig, setup: Setup, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The pipeline's model keys (`train.step.STEP_KEYS`) as ShapeDtypeStructs with `sharding`:
    input_ids, attention_mask, labels, loss_mask (b, L); pixel_values_videos (b, Bt, 6, S, S)."""
    b, length, s = setup.batch, setup.row_length(cfg), setup.image_size
    channels = cfg.temporal_patch_size * cfg.vision.num_channels
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return dict(input_ids=sds((b, length), jnp.int32), attention_mask=sds((b, length), jnp.bool_),
                pixel_values_videos=sds((b, setup.tubelets(cfg), channels, s, s), jnp.float32),
                labels=sds((b, length), jnp.int32), loss_mask=sds((b, length), jnp.bool_),
                valid=sds((b,), jnp.bool_))


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard
    of each leaf: shards of an evenly divided array are all the same size)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def plan_for(cfg: VLMConfig, setup: Setup):
    """The paper's plan for this setup's visual tokens, or None (budget 0)."""
    if not setup.budget:
        return None
    return progressive(cfg.text.num_layers, setup.visual_tokens(cfg), setup.budget, shape=setup.shape)


def compile_step(cfg: VLMConfig, mesh, setup: Setup, *, compiler_options: dict | None = None,
                 log=lambda msg: None) -> dict[str, Any]:
    """Lowers and compiles one train step abstractly; returns its analysis (bytes) and timings.

    compiler_options: XLA options of the compile (COMPILER_OPTIONS: no LLVM optimisation).
    log: called with a progress line once the step is lowered.
    """
    model = nnx.eval_shape(lambda: NemotronHVLModel(cfg, rngs=nnx.Rngs(0)))  # float32 master weights
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ocfg = OptimConfig(accumulate=setup.accumulate, freeze=setup.freeze)
    tx = make_optimizer(ocfg, params)
    layout = StateLayout.of(params, tx, mesh)
    state = layout.abstract(params, tx)
    batch = abstract_batch(cfg, setup, layout.batch())
    frames = setup.tubelets(cfg) * cfg.temporal_patch_size
    sequence, plans = sequence_split(mesh, {frames: plan_for(cfg, setup)})
    plan = plans[frames]
    step = make_train_step(graphdef, rest, tx, optim_config=ocfg, answer_ids=ANSWER_IDS, plan_for_bucket=plans,
                           compute_dtype=jnp.bfloat16, remat_policy=setup.remat, constrain=layout.constrain,
                           sequence=sequence)
    t0 = time.perf_counter()
    lowered = layout.jit_step(step).lower(state, batch)
    t1 = time.perf_counter()
    log(f"lowered in {t1 - t0:.1f}s; compiling ...")
    compiled = lowered.compile(compiler_options)
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    param_b, opt_b = shard_bytes(state.params), shard_bytes(state.opt_state)
    args = int(mem.argument_size_in_bytes)
    return dict(
        plan=None if plan is None else dict(name=plan.name, budget=plan.achieved_budget,
                                            stages=[list(s) for s in plan.stages]),
        parameters=count(params),
        bytes=dict(parameters=param_b, optimizer=opt_b, other_arguments=args - param_b - opt_b,
                   arguments=args, temporaries=int(mem.temp_size_in_bytes), outputs=int(mem.output_size_in_bytes),
                   aliased=int(mem.alias_size_in_bytes),
                   total=args + int(mem.temp_size_in_bytes) + int(mem.output_size_in_bytes)
                   - int(mem.alias_size_in_bytes)),
        batch_bytes=shard_bytes(batch),
        lower_seconds=t1 - t0, compile_seconds=t2 - t1,
    )


def whole_model_state_bytes(cfg: VLMConfig, mesh, setup: Setup) -> dict[str, int]:
    """Per-device parameter and optimizer bytes of `cfg` (shapes only, nothing compiled)."""
    model = nnx.eval_shape(lambda: NemotronHVLModel(cfg, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(OptimConfig(accumulate=setup.accumulate, freeze=setup.freeze), params)
    state = StateLayout.of(params, tx, mesh).abstract(params, tx)
    return dict(parameters=shard_bytes(state.params), optimizer=shard_bytes(state.opt_state),
                parameter_count=count(params))


# ----------------------------------------------------------------------------- report


def machine_info() -> dict:
    dev = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=dev.device_kind, devices=jax.device_count(),
                cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                jax=jax.__version__)


def unit_of(b: dict[str, int]) -> tuple[str, int]:
    """GiB, or MiB when the whole step is under 1 GiB (small models)."""
    return ("GiB", GiB) if max(b.values()) >= GiB else ("MiB", 2**20)


def table(b: dict[str, int], *, device_gib: float, headroom_gib: float) -> list[str]:
    """The per-device lines of the report (in `unit_of(b)`)."""
    _, scale = unit_of(b)
    g = lambda key: f"{b[key] / scale:>9.2f}"
    usable = device_gib - headroom_gib
    fits = b["total"] / GiB <= usable
    return [
        f"  {'parameters (f32 masters)':<34}{g('parameters')}",
        f"  {'optimizer state (AdamW)':<34}{g('optimizer')}",
        f"  {'other arguments (batch, step, key)':<34}{g('other_arguments')}",
        f"  {'temporaries':<34}{g('temporaries')}",
        f"  {'outputs':<34}{g('outputs')}   ({b['aliased'] / scale:.2f} aliased to the donated state)",
        f"  {'total':<34}{g('total')}   vs {usable:g} GiB usable of {device_gib:g}: "
        + ("fits" if fits else "does not fit"),
    ]


def parse_mesh(F) -> MeshConfig:
    mesh = MeshConfig(data=F["mesh.data"].value, fsdp=F["mesh.fsdp"].value, sequence=F["mesh.sequence"].value,
                      tensor=F["mesh.tensor"].value)
    try:
        mesh.sizes(F.devices)
    except ValueError as e:
        raise cli.UsageError(f"--{e}") from None
    return mesh


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    cli_checks.at_least("--devices", F.devices, 1)
    mesh_cfg = parse_mesh(F)
    data, fsdp, sequence, tensor = mesh_cfg.sizes(F.devices)
    shards = data * fsdp
    batch = F.batch if F.batch is not None else shards
    cli_checks.at_least("--batch", batch, 1)
    cli_checks.require(batch % shards == 0, "--batch", f"{batch} rows do not split over the {shards} "
                       f"data-parallel shards (mesh.data x mesh.fsdp = {data} x {fsdp})")
    cli_checks.at_least("--accumulate", F.accumulate, 1)
    cli_checks.require(batch % (F.accumulate * shards) == 0, "--accumulate",
                       f"{batch} rows do not split into {F.accumulate} micro-batches of a multiple of {shards} rows")
    cli_checks.at_least("--frames", F.frames, 1)
    cli_checks.in_range("--budget", F.budget, 0.0, 1.0)
    for name in ("frame_text_tokens", "text_tokens"):
        cli_checks.at_least(f"--{name}", F[name].value, 0)
    bad = [p for p in F.freeze if p not in PARTS]
    cli_checks.require(not bad, "--freeze", f"unknown part(s) {bad}; choose among {', '.join(PARTS)}")
    cli_checks.at_least("--device_memory_gib", F.device_memory_gib, 0.0)
    cli_checks.in_range("--headroom_gib", F.headroom_gib, 0.0, F.device_memory_gib)
    if F.json:
        cli_checks.output_file("--json", F.json)
    full = model_config(F.model)
    if F.layers is not None:
        cli_checks.in_range("--layers", F.layers, 1, full.text.num_layers)
    if F.vision_layers is not None:
        cli_checks.in_range("--vision_layers", F.vision_layers, 1, full.vision.num_layers)
    image_size = F.image_size if F.image_size is not None else full.image_size
    cli_checks.require(image_size is not None, "--image_size", f"needed: model {F.model} sets no image_size")
    grid = full.vision.patch_size * full.merge
    cli_checks.require(image_size >= grid and image_size % grid == 0, "--image_size",
                       f"{image_size} is not a positive multiple of patch_size x merge = {grid}")
    try:
        cfg = cut(full, layers=F.layers, vision_layers=F.vision_layers, image_size=image_size)
    except ConfigError as e:
        raise cli.UsageError(str(e)) from None
    setup = Setup(frames=F.frames, batch=batch, image_size=image_size, frame_text_tokens=F.frame_text_tokens,
                  text_tokens=F.text_tokens, budget=F.budget, shape=F.shape, remat=F.remat, freeze=tuple(F.freeze),
                  accumulate=F.accumulate)
    cli_checks.require(not setup.budget or any(kind in cfg.text.pattern for kind in "M*"), "--budget",
                       "the LM has no Mamba or attention layer to score visual tokens with (use --budget 0)")
    plan_for(cfg, setup)  # an impossible budget fails here (PlanError), before the compile
    tokens = setup.row_length(cfg) - (setup.visual_tokens(cfg) - setup.lm_visual_tokens(cfg))
    cli_checks.require(tokens % sequence == 0 and tokens // sequence >= cfg.text.conv_kernel - 1, "--mesh.sequence",
                       f"a {tokens}-token LM prompt does not split into {sequence} equal shards of at least "
                       f"{cfg.text.conv_kernel - 1} tokens (the Mamba conv's halo)")

    # Fake devices: CPU only, as many as asked; must precede JAX's backend initialisation.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", F.devices)
    mesh = make_mesh(mesh_cfg)
    info = machine_info()
    is_cut = F.layers is not None or F.vision_layers is not None
    print("Ahead-of-time fit check: one train step, lowered and compiled (never run, nothing allocated); "
          "XLA's memory analysis per device, by the CPU compiler (an estimate of a GPU's or TPU's: see --help)")
    print("note: the CPU compiler undoes remat (jax.checkpoint), so temporaries are those of a step keeping "
          "every layer's activations: an upper bound where remat is honoured (GPU, TPU)")
    print(f"model {F.model}: LM {cfg.text.num_layers} layers (hidden {cfg.text.hidden_size}), vision tower "
          f"{cfg.vision.num_layers} layers (width {cfg.vision.hidden_size})"
          + (f"  [CUT: the whole model has {full.text.num_layers} + {full.vision.num_layers} layers]"
             if is_cut else ""))
    print(f"mesh {' x '.join(f'{a} {s}' for a, s in zip(AXES, (data, fsdp, sequence, tensor)))} = {F.devices} fake "
          f"{info['backend'].upper()} devices ({info['cpu_count']} host cores)")
    print(f"batch {batch} rows x {setup.row_length(cfg)} tokens: {F.frames} frames = {setup.tubelets(cfg)} tubelets "
          f"x {cfg.tokens_per_tubelet(image_size, image_size)} visual tokens ({setup.visual_tokens(cfg)}) at "
          f"{image_size}px + text; bf16 compute on f32 master weights, remat {F.remat}, AdamW"
          + (f", frozen: {','.join(setup.freeze)}" if setup.freeze else "")
          + (f", accumulate {F.accumulate}" if F.accumulate > 1 else ""), flush=True)
    t0 = time.perf_counter()
    row = compile_step(cfg, mesh, setup, compiler_options=COMPILER_OPTIONS if F.fast_compile else None,
                       log=lambda msg: print(msg, flush=True))
    wall = time.perf_counter() - t0
    plan = row["plan"]
    if plan is None:
        print("plan: none (no reduction)")
    else:
        stages = " ".join(f"L{layer}:{keep}" for layer, keep in plan["stages"])
        print(f"plan: {plan['name']} at budget {plan['budget']:.3f}: {stages} (visual tokens kept from layer L)")
    print(f"per device, {unit_of(row['bytes'])[0]} ({row['parameters'] / 1e9:.3g}B parameters"
          + (" in the cut model" if is_cut else "") + "):")
    for line in table(row["bytes"], device_gib=F.device_memory_gib, headroom_gib=F.headroom_gib):
        print(line)
    whole = None
    if is_cut:
        whole = whole_model_state_bytes(full, mesh, setup)
        print(f"  the whole model ({whole['parameter_count'] / 1e9:.2f}B parameters): parameters "
              f"{whole['parameters'] / GiB:.2f}, optimizer state {whole['optimizer'] / GiB:.2f} GiB per device "
              "(exact, from shapes); temporaries above are the cut model's")
    print(f"lower {row['lower_seconds']:.1f}s, compile {row['compile_seconds']:.1f}s, wall {wall:.1f}s")
    b = row["bytes"]
    fits = b["total"] / GiB <= F.device_memory_gib - F.headroom_gib
    if F.json:
        atomic.write_json(F.json, dict(
            machine=info, analysis=f"XLA {info['backend']} compiler memory_analysis(), per device",
            model=F.model, config=cfg.to_dict(), cut=is_cut, whole_model=whole,
            mesh=dict(zip(AXES, (data, fsdp, sequence, tensor))), devices=F.devices, setup=dataclasses.asdict(setup),
            tokens=setup.row_length(cfg), visual_tokens=setup.visual_tokens(cfg), plan=plan,
            parameters=row["parameters"], bytes=b, gib={k: v / GiB for k, v in b.items()},
            device_memory_gib=F.device_memory_gib, headroom_gib=F.headroom_gib, fits=fits,
            lower_seconds=row["lower_seconds"], compile_seconds=row["compile_seconds"], wall_seconds=wall),
            default=float)


if __name__ == "__main__":
    cli.run(main, define_flags)
