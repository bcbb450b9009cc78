"""grain input pipelines over any random-access source of `VideoQARecord`s.

    cfg = PipelineConfig.for_model(model.config, batch_size=16, buckets=(16, 32, 64))
    it = iter(train_pipeline(source, cfg, tokenizer=tok, mesh=mesh))   # endless, shuffled
    batch = next(it)          # dict: input_ids, attention_mask, pixel_values_videos, labels, ...
    it.stats                  # PipelineStats: batches, examples, skipped (by kind, by record)
    for batch in eval_pipeline(source, cfg, tokenizer=tok): ...       # fixed order, once

Stages (this process):
    MapDataset.source(source)[shard_index::shard_count]       per-process slice
      .shuffle(seed).repeat()                                 training only (reshuffled each epoch)
      .map(PrepareExample)        frames (read_video / in memory) -> resize, normalise, tubelets,
                                  video prompt + record.text(), tokenize; a bad video -> Skipped
    BucketBatchIterDataset        one buffer per frame bucket; batches never mix buckets;
                                  evaluation flushes partial batches with padding rows
    mp_prefetch(workers)  or  ThreadPrefetchIterDataset(prefetch)      host-side prefetch
    OutputIterDataset             skip warnings + stats, multi-process lockstep, to_device(mesh)

Layout of a batch: `hybridvlm.data.layout`. Saving the iterator with the model:
`hybridvlm.data.pipeline_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
from absl import flags
from jax.sharding import Mesh
from tokenizers import Tokenizer

from hybridvlm.data.layout import HOST_KEYS, IGNORE, MODEL_KEYS, collate, pad_to_bucket, padding_batch
from hybridvlm.data.pipeline_bucket import BucketBatchIterDataset
from hybridvlm.data.pipeline_checkpoint import (ITERATOR_ITEM, restore_args, restore_iterator, save_args,
                                                save_iterator)
from hybridvlm.data.pipeline_config import PipelineConfig, PipelineError, answer_token_ids, image_token
from hybridvlm.data.pipeline_example import Example, PrepareExample, Skipped
from hybridvlm.data.pipeline_output import (Gather, OutputIterDataset, PipelineStats, batch_sharding,
                                            default_gather, to_device)
from hybridvlm.data.records import VideoQARecord

__all__ = [
    "HOST_KEYS", "IGNORE", "ITERATOR_ITEM", "MODEL_KEYS", "Example", "PipelineConfig", "PipelineError",
    "PipelineStats", "PrepareExample", "Skipped", "answer_token_ids", "batch_sharding", "collate", "eval_pipeline",
    "image_token", "pad_to_bucket", "padding_batch", "restore_args", "restore_iterator", "save_args",
    "save_iterator", "shard_slice", "to_device", "train_pipeline",
]

Shard = grain.sharding.ShardOptions | tuple[int, int] | None


def shard_slice(shard: Shard) -> tuple[int, int, bool]:
    """(shard_index, shard_count, drop_remainder); None: this JAX process's shard."""
    if shard is None:
        shard = grain.sharding.ShardByJaxProcess()
    if isinstance(shard, grain.sharding.ShardOptions):
        index, count, drop = shard.shard_index, shard.shard_count, shard.drop_remainder
    else:
        (index, count), drop = shard, False
    if not 0 <= index < count:
        raise PipelineError(f"shard index {index} is not in [0, {count})")
    return int(index), int(count), bool(drop)


def _records(source: Sequence[VideoQARecord], shard: Shard, *, allow_empty: bool) -> tuple[grain.MapDataset, int]:
    """This process's slice of the source (shard i of n reads records i, i + n, ...), and n."""
    index, count, drop = shard_slice(shard)
    ds = grain.MapDataset.source(source)
    if drop:
        ds = ds[: len(ds) - len(ds) % count]
    ds = ds[index::count]
    if len(ds) == 0 and not allow_empty:
        raise PipelineError(f"shard {index} of {count} is empty: the source holds {len(source)} records")
    return ds, count


def _assemble(examples: grain.MapDataset, cfg: PipelineConfig, *, rows: int, flush: bool,
              max_consecutive_skips: int | None, mesh: Mesh | None, gather: Gather | None) -> grain.IterDataset:
    ds = BucketBatchIterDataset(examples, cfg=cfg, rows=rows, flush=flush, read_threads=cfg.read_threads,
                                read_ahead=rows, max_consecutive_skips=max_consecutive_skips)
    if cfg.workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's workers read absl flags (their defaults here): a script that is not an
            # absl app (a notebook, pytest) has not parsed them.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers,
                                                         per_worker_buffer_size=max(cfg.prefetch, 1)))
    elif cfg.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    return OutputIterDataset(ds, cfg=cfg, rows=rows, mesh=mesh, gather=gather)


def train_pipeline(source: Sequence[VideoQARecord], cfg: PipelineConfig, *, tokenizer: Tokenizer,
                   shard: Shard = None, mesh: Mesh | None = None, gather: Gather | None = None) -> grain.IterDataset:
    """Endless training batches: this process's shard, shuffled by `cfg.seed` (differently each
    epoch), grouped by frame bucket, `cfg.batch_size / shard_count` rows each.

    Every row has an answer: labels hold the answer letter's id at the last column (what the
    logits there predict), -100 elsewhere; records without an answer are skipped and counted.
    Partial buckets are never emitted (no padding rows in training). A shard with nothing
    readable raises PipelineError after two epochs (per worker) of skips in a row.
    shard: grain ShardOptions or (index, count); default: `ShardByJaxProcess`.
    mesh: place batches on it (rows over `cfg.data_axis`: data x fsdp); None: numpy batches.
    gather: the cross-process exchange for lockstep buckets (default: process_allgather
      when jax.process_count() > 1; see `hybridvlm.data.pipeline_output`).
    """
    records, count = _records(source, shard, allow_empty=False)
    # Two epochs in a row skipped (per worker) hold a whole epoch: nothing is readable.
    give_up = 2 * len(records) * max(cfg.workers, 1)
    examples = records.shuffle(cfg.seed).repeat(None).map(PrepareExample(cfg, tokenizer, train=True))
    return _assemble(examples, cfg, rows=cfg.local_batch_size(count), flush=False, max_consecutive_skips=give_up,
                     mesh=mesh, gather=default_gather() if gather is None else gather)


def eval_pipeline(source: Sequence[VideoQARecord], cfg: PipelineConfig, *, tokenizer: Tokenizer,
                  shard: Shard = None, mesh: Mesh | None = None, gather: Gather | None = None) -> grain.IterDataset:
    """Evaluation batches: this process's shard once, in source order, grouped by frame
    bucket; each bucket's last partial batch is padded with padding rows (`valid` False),
    so every readable example is scored exactly once. No answer is appended; rows keep
    uid, answer index, number of options, bucket, timestamps and meta. Unreadable videos
    are skipped and counted (`iterator.stats`). Arguments as `train_pipeline`."""
    records, count = _records(source, shard, allow_empty=True)  # an empty shard contributes padding rows
    examples = records.map(PrepareExample(cfg, tokenizer, train=False))
    return _assemble(examples, cfg, rows=cfg.local_batch_size(count), flush=True, max_consecutive_skips=None,
                     mesh=mesh, gather=default_gather() if gather is None else gather)
