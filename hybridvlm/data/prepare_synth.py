"""Prepares SynthVideoQA (TFDS array_record files) in a data directory.

    python -m hybridvlm.data.prepare_synth --data_dir DIR --frames 32 --train 2000 --validation 200 --test 200

Writes DIR/synth_video_qa/frames32/1.0.0/ (`--size` / `--seed` other than 128 / 0 add
"_size<S>" / "_seed<B>" to the config name), read back with
`hybridvlm.data.synth_tfds.synth_source(DIR, split, num_frames)`. Split s is
generated from seed 3 * --seed + (0 train, 1 validation, 2 test). The data is built in
a temporary directory inside --data_dir and renamed into place at the end, so an
error or Ctrl-C leaves nothing behind. Flags are checked before anything is
generated; an error prints one line (`--debug` for the traceback): exit status 2 for
a usage error (a bad flag or value), 1 for the rest (an unusable --data_dir, a
variant that is already there).
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from hybridvlm import cli, cli_checks
from hybridvlm.data import synth, synth_tfds


def make_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m hybridvlm.data.prepare_synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="data directory (created if missing)")
    parser.add_argument("--frames", type=int, default=synth.DEFAULT_FRAMES,
                        help=f"frames per video, {synth.MIN_FRAMES}..{synth.MAX_FRAMES} (2 fps) (default: %(default)s)")
    for split in synth.SPLITS:
        parser.add_argument(f"--{split}", type=int, default=synth_tfds.DEFAULT_SPLIT_SIZES[split],
                            help=f"examples in the {split} split, 0 to leave it out (default: %(default)s)")
    parser.add_argument("--size", type=int, default=synth.DEFAULT_SIZE,
                        help=f"frame side in pixels, >= {synth.MIN_SIZE} (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed, >= 0; split seeds are 3*seed + 0/1/2 (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    """Prepares the variant the flags name; returns 0. Bad flags exit 2 (one line); an unusable
    --data_dir or an existing variant raises cli.InputError (reported as one line, status 1)."""
    args = make_parser().parse_args(argv)
    cli_checks.in_range("--frames", args.frames, synth.MIN_FRAMES, synth.MAX_FRAMES)
    sizes = {split: cli_checks.at_least(f"--{split}", getattr(args, split), 0) for split in synth.SPLITS}
    cli_checks.require(any(sizes.values()), "--train/--validation/--test", "all are 0, nothing to prepare")
    cli_checks.at_least("--size", args.size, synth.MIN_SIZE)
    cli_checks.at_least("--seed", args.seed, 0)
    cli_checks.output_dir("--data_dir", args.data_dir)
    path = synth_tfds.dataset_path(args.data_dir, args.frames, args.size, args.seed)
    if os.path.exists(path):
        raise cli.InputError(f"--data_dir: {path}: already exists (delete it to prepare it again)")

    tfds.display_progress_bar(False)  # one bar per split, ours, with its total
    path = synth_tfds.prepare(args.data_dir, args.frames, size=args.size, base_seed=args.seed, split_sizes=sizes,
                              progress=True)
    counts = ", ".join(f"{split} {n}" for split, n in sizes.items() if n)
    print(f"wrote {path}: {counts} examples of {args.frames} frames, {args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    cli.run_argparse(main)
