"""Converts an HF Nemotron-H checkpoint to a hybridvlm Orbax checkpoint.

    python -m hybridvlm.convert --hf DIR --out DIR [--dtype bfloat16]

The output is written to a temporary directory and renamed when complete;
on any error nothing is left at --out.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
from flax import nnx

from hybridvlm import checkpoint
from hybridvlm.loading import from_pretrained
from hybridvlm.tokenizer import TOKENIZER_FILE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridvlm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="HF directory (LM or VLM): config.json + *.safetensors")
    parser.add_argument("--out", required=True, help="new output directory (must not exist)")
    parser.add_argument("--dtype", default=None, help="parameter dtype (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out}: output directory already exists")
    if not os.path.isfile(os.path.join(args.hf, "config.json")):
        parser.error(f"{args.hf}: not an HF checkpoint directory (no config.json)")
    model = from_pretrained(args.hf, dtype=args.dtype)
    tok = os.path.join(args.hf, TOKENIZER_FILE)
    checkpoint.save(model, args.out, extra_files=(tok,) if os.path.exists(tok) else ())
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"wrote {args.out}: {type(model).__name__}, LM pattern {model.text_config.pattern}, {n:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
