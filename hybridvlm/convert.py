"""Converts between HF Nemotron-H checkpoints and hybridvlm Orbax checkpoints.

    python -m hybridvlm.convert --hf DIR --out DIR [--dtype bfloat16]
    python -m hybridvlm.convert --to-hf --checkpoint DIR --out DIR [--dtype bfloat16] [--max-shard-size 5GB]

The first imports an HF directory (LM or VLM) into a hybridvlm checkpoint;
the second (`--to-hf`) exports a checkpoint back to an HF directory
(config.json + safetensors, sharded with an index above --max-shard-size,
tokenizer.json copied if present) that `from_pretrained` and transformers
load. The output is written to a temporary directory and renamed when
complete; on any error nothing is left at --out. The paths and the dtype
are checked before the model is loaded; an error prints one line (`--debug`
for the traceback): exit status 2 for a usage error, 1 for a bad checkpoint.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from flax import nnx

from hybridvlm import checkpoint, cli, cli_checks, hf_export
from hybridvlm.loading import from_pretrained
from hybridvlm.tokenizer import TOKENIZER_FILE


def _dtype(name: str) -> str:
    """argparse type of --dtype: a floating dtype name jnp understands."""
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (e.g. float32, bfloat16)") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise argparse.ArgumentTypeError(f"{name!r} is not a floating-point dtype")
    return name


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """argparse type of --max-shard-size: bytes, or a number with KB/MB/GB (KiB/MiB/GiB), e.g. 5GB."""
    value, unit = text.strip().upper(), 1
    for suffix, factor in _SIZE_UNITS.items():
        if value.endswith(suffix):
            value, unit = value[: -len(suffix)], factor
            break
    try:
        size = int(float(value) * unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 5GB, 500MB, 1000000)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return size


def make_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m hybridvlm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", help="import: HF directory (LM or VLM): config.json + *.safetensors")
    parser.add_argument("--to-hf", action="store_true", help="export --checkpoint to an HF directory instead")
    parser.add_argument("--checkpoint", help="export: a hybridvlm checkpoint directory (or an HF one)")
    parser.add_argument("--out", required=True, help="new output directory (must not exist)")
    parser.add_argument("--dtype", default=None, type=_dtype, help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default=hf_export.MAX_SHARD_BYTES, type=_size,
                        help="export: largest safetensors file before splitting into several with an index "
                             "(default 5GB)")
    parser.add_argument("--tied-head-copy", action="store_true",
                        help="export: a model with a tied head also writes lm_head.weight (a copy of the "
                             "embedding), for transformers' NemotronH, which never ties")
    return parser


def main(argv=None) -> int:
    """Converts; returns 0. Bad arguments exit (status 2, one line); a bad checkpoint raises
    (FileNotFoundError / CheckpointError / ConfigError), reported as one line under __main__."""
    parser = make_parser()
    args = parser.parse_args(argv)
    source_flag = "--checkpoint" if args.to_hf else "--hf"
    source = args.checkpoint if args.to_hf else args.hf
    if source is None:
        parser.error(f"{source_flag} is required" + (" with --to-hf" if args.to_hf else " (or --to-hf --checkpoint)"))
    if args.to_hf and args.hf is not None:
        parser.error("--hf: not used with --to-hf (the source is --checkpoint)")
    if not args.to_hf and args.checkpoint is not None:
        parser.error("--checkpoint: only with --to-hf (an import reads --hf)")
    if os.path.exists(args.out):
        parser.error(f"--out: {args.out}: already exists (give a new directory)")
    cli_checks.output_dir("--out", args.out, new=True)
    cli_checks.checkpoint_dir(source_flag, source)
    model = from_pretrained(source, dtype=args.dtype)
    tok = os.path.join(source, TOKENIZER_FILE)
    extra = (tok,) if os.path.exists(tok) else ()
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if args.to_hf:
        files = hf_export.export_hf(model, args.out, max_shard_bytes=args.max_shard_size,
                                    tied_head_copy=args.tied_head_copy, extra_files=extra)
        print(f"wrote {args.out}: HF {type(model).__name__}, {n:,} parameters in {len(files)} safetensors file(s)")
        return 0
    checkpoint.save(model, args.out, extra_files=extra)
    print(f"wrote {args.out}: {type(model).__name__}, LM pattern {model.text_config.pattern}, {n:,} parameters")
    return 0


if __name__ == "__main__":
    cli.run_argparse(main)
