"""Converts an HF Nemotron-H checkpoint to a hybridvlm Orbax checkpoint.

    python -m hybridvlm.convert --hf DIR --out DIR [--dtype bfloat16]

The output is written to a temporary directory and renamed when complete;
on any error nothing is left at --out. The paths and the dtype are checked
before the model is loaded; an error prints one line (`--debug` for the
traceback): exit status 2 for a usage error, 1 for a bad checkpoint.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from flax import nnx

from hybridvlm import checkpoint, cli, cli_checks
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


def make_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m hybridvlm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="HF directory (LM or VLM): config.json + *.safetensors")
    parser.add_argument("--out", required=True, help="new output directory (must not exist)")
    parser.add_argument("--dtype", default=None, type=_dtype, help="parameter dtype (default: the checkpoint's)")
    return parser


def main(argv=None) -> int:
    """Converts; returns 0. Bad arguments exit (status 2, one line); a bad checkpoint raises
    (FileNotFoundError / CheckpointError / ConfigError), reported as one line under __main__."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out: {args.out}: already exists (give a new directory)")
    cli_checks.output_dir("--out", args.out, new=True)
    cli_checks.checkpoint_dir("--hf", args.hf)
    model = from_pretrained(args.hf, dtype=args.dtype)
    tok = os.path.join(args.hf, TOKENIZER_FILE)
    checkpoint.save(model, args.out, extra_files=(tok,) if os.path.exists(tok) else ())
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"wrote {args.out}: {type(model).__name__}, LM pattern {model.text_config.pattern}, {n:,} parameters")
    return 0


if __name__ == "__main__":
    cli.run_argparse(main)
