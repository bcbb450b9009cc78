"""The accuracy run behind `python -m eval.videoqa`: records -> bucketed batches -> every
variant's answers, times and kept frames -> one result row per variant.

    records = open_records("synth:test", seed=0, num_examples=64, frames=(16, 32), frame_size=64)
    report = run_videoqa(model, tok, records, variants, batch_size=8, buckets=(16, 32))

Every batch is run by every variant (the same rows, one after another), so accuracies are
paired and the times are measured side by side. The answer is the option letter with the
highest logit at the prompt's last position, among the row's own options; as a check,
`greedy_batches` batches per bucket are also answered by greedy decoding
(`model.generate`, one token) and compared.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from eval.qa_programs import QAPrograms, with_evs
from eval.qa_variants import FULL, Variant
from hybridvlm.data import synth
from hybridvlm.data.layout import MODEL_KEYS
from hybridvlm.data.pipeline import PipelineConfig, answer_token_ids, eval_pipeline
from hybridvlm.data.pipeline_config import LENGTH_MULTIPLE
from hybridvlm.data.pipeline_example import PrepareExample, subsample_frames
from hybridvlm.data.readers import read_benchmark
from hybridvlm.data.records import LETTERS, VideoQARecord
from hybridvlm.data.synth_tfds import synth_source
from hybridvlm.vlm import NemotronHVLModel
from train.data import parse_spec

# ----------------------------------------------------------------------------- data


def open_records(spec: str, *, seed: int, num_examples: int | None, frames: Sequence[int], frame_size: int,
                 split: str = "test", flag: str = "--data") -> Sequence[VideoQARecord]:
    """The records of a data spec (see `eval.videoqa`); the first `num_examples` (None: all).

    "synth:SPLIT" generates SPLIT (train / validation / test) of base seed `seed` with
    videos of `frames` frames taken in turn; "synth:DIR" reads the prepared `split` of DIR.
    ValueError / FileNotFoundError naming `flag`."""
    kind, _, rest = spec.partition(":")
    if kind.strip().lower() == "synth" and rest in synth.SPLITS:
        n = 256 if num_examples is None else num_examples
        lengths = tuple(frames) if len(frames) > 1 else frames[0]
        return synth.SynthSource(synth.split_seed(seed, rest), n, lengths, frame_size=frame_size)
    parsed = parse_spec(spec, flag)
    if parsed.kind == "synth":
        if parsed.path is None:
            raise ValueError(f"{flag}={spec!r}: give synth:SPLIT (one of {', '.join(synth.SPLITS)}) or synth:DIR")
        if len(frames) != 1:
            raise ValueError(f"{flag}: a prepared SynthVideoQA split has one video length; give one --frames value")
        records = synth_source(parsed.path, split, frames[0], size=frame_size, base_seed=seed)
    else:
        records = read_benchmark(parsed.kind, parsed.path).records
    if num_examples is not None and num_examples < len(records):
        records = [records[i] for i in range(num_examples)]
    return records


def row_lengths(records: Sequence[VideoQARecord], cfg: PipelineConfig, tok: Tokenizer) -> dict[int, int]:
    """{bucket: static row length} that fits every record with in-memory frames exactly
    (rounded up to LENGTH_MULTIPLE); buckets of records read from files (their timestamps
    are known only once decoded) keep the config's budget."""
    prep = PrepareExample(cfg, tok, train=False)
    need: dict[int, int] = {}
    for record in records:
        if record.frames is None:
            return {b: cfg.row_length(b) for b in cfg.buckets}
        _, times = subsample_frames(record.frames, record.timestamps, cfg.frames)
        bucket = cfg.bucket_for(len(times))
        ids = prep.prompt_ids(record, times)
        laid = cfg.visual_tokens(bucket) - cfg.tubelets(len(times)) * cfg.tokens_per_tubelet + ids.size
        need[bucket] = max(need.get(bucket, 0), laid)
    return {b: -(-need.get(b, 1) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE for b in cfg.buckets}


# ----------------------------------------------------------------------------- kept frames


def answer_frames_kept(batch: dict, kept: np.ndarray, cfg: PipelineConfig) -> list[float | None]:
    """Per row: the share of the question's answering frames (`meta["answer_frames"]`,
    SynthVideoQA) with at least one visual token among the columns `kept` reaches the last
    layer with; None for rows without that ground truth (and padding rows)."""
    out: list[float | None] = []
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]).astype(bool)
    for r in range(ids.shape[0]):
        meta = batch["meta"][r]
        if not batch["valid"][r] or "answer_frames" not in meta:
            out.append(None)
            continue
        answer = np.flatnonzero(np.asarray(meta["answer_frames"])[: int(batch["num_frames"][r])])
        if answer.size == 0:
            out.append(None)
            continue
        slots = np.flatnonzero((ids[r] == cfg.image_token_id) & mask[r])  # real placeholders, slot order
        kept_tubelets = np.unique(np.flatnonzero(np.isin(slots, kept[r])) // cfg.tokens_per_tubelet)
        out.append(float(np.mean(np.isin(answer // cfg.temporal_patch, kept_tubelets))))
    return out


# ----------------------------------------------------------------------------- tallies


@dataclasses.dataclass
class Tally:
    """What one variant accumulated over the batches."""

    n: int = 0
    correct: int = 0
    per_task: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(lambda: [0, 0]))
    prefill_s: list = dataclasses.field(default_factory=list)
    ttft_s: list = dataclasses.field(default_factory=list)
    frames_kept: list = dataclasses.field(default_factory=list)
    budget_weighted: float = 0.0
    greedy_n: int = 0
    greedy_correct: int = 0
    greedy_agree: int = 0

    def add(self, batch: dict, pred: np.ndarray) -> None:
        for r in np.flatnonzero(batch["valid"]):
            if batch["answer"][r] < 0:
                continue
            ok = int(pred[r] == batch["answer"][r])
            self.n += 1
            self.correct += ok
            cell = self.per_task[str(batch["task"][r]) or "all"]
            cell[0] += 1
            cell[1] += ok


def letter_predictions(letter_logits: np.ndarray, num_options: np.ndarray) -> np.ndarray:
    """(b,) index of the best option among each row's own options (letters past
    num_options are never chosen)."""
    n = letter_logits.shape[1]
    masked = np.where(np.arange(n)[None, :] < np.maximum(num_options, 1)[:, None], letter_logits, -np.inf)
    return np.argmax(masked, axis=1)


# ----------------------------------------------------------------------------- the run


def run_videoqa(model: NemotronHVLModel, tok: Tokenizer, records: Sequence[VideoQARecord], variants: Sequence[Variant],
                *, batch_size: int, buckets: Sequence[int], fps: float | None = None, greedy_batches: int = 1,
                progress: bool = True) -> dict:
    """Evaluates every variant on every record; returns the report (see `eval.videoqa`).

    Plans are built per bucket before anything runs (PlanError names the variant); the
    bucket's programs are compiled before its first batch and warmed up once, so no
    compilation falls inside a timed call."""
    vcfg = model.config
    base = PipelineConfig.for_model(vcfg, batch_size=batch_size, buckets=tuple(buckets), fps=fps,
                                    long_prompts="skip")
    lengths = row_lengths(records, base, tok)
    cfg = dataclasses.replace(base, row_lengths=tuple(lengths[b] for b in base.buckets))
    letters = answer_token_ids(tok)
    num_layers = vcfg.text.num_layers
    plans = {}
    for v in variants:
        for b in cfg.buckets:
            try:
                plans[(b, v)] = v.plan(num_layers, v.lm_visual(cfg.tubelets(b), cfg.tokens_per_tubelet))
            except ValueError as e:
                raise ValueError(f"--plans {v.label}: {b}-frame bucket: {e}") from None
    programs = QAPrograms(model, letters)
    tallies = {v: Tally() for v in variants}
    rates = sorted({v.evs for v in variants})
    seen_buckets: dict[int, int] = collections.Counter()
    it = iter(eval_pipeline(records, cfg, tokenizer=tok, shard=(0, 1)))
    bar = tqdm(total=len(records), desc="videoqa", unit="ex", disable=not progress, dynamic_ncols=True)
    try:
        for batch in it:
            bucket = int(batch["bucket"][0])
            inputs = {k: batch[k] for k in MODEL_KEYS}
            first = seen_buckets[bucket] == 0
            if first:  # compile every program of the bucket, then one untimed warm-up call each
                for v in variants:
                    programs.compile(bucket, inputs, v, plans[(bucket, v)])
            embedded = {}
            for rate in rates:
                if first:
                    programs.embed(bucket, rate, inputs)
                embedded[rate] = programs.embed(bucket, rate, inputs)
            for v in variants:
                emb, embed_s = embedded[v.evs]
                if first:
                    programs.prefill(bucket, v, emb)
                (letter_logits, top1, kept), prefill_s = programs.prefill(bucket, v, emb)
                letter_logits, top1, kept = jax.device_get((letter_logits, top1, kept))
                pred = letter_predictions(letter_logits, batch["num_options"])
                t = tallies[v]
                t.add(batch, pred)
                t.prefill_s.append(prefill_s)
                t.ttft_s.append(embed_s + prefill_s)
                rows = int(np.sum(batch["valid"]))
                t.budget_weighted += rows * v.overall_budget(plans[(bucket, v)], cfg.tubelets(bucket),
                                                             cfg.tokens_per_tubelet)
                t.frames_kept += [s for s in answer_frames_kept(batch, kept, cfg) if s is not None]
                if seen_buckets[bucket] < greedy_batches:
                    _greedy_check(model, tok, batch, v, plans[(bucket, v)], pred, t)
            seen_buckets[bucket] += 1
            bar.update(int(np.sum(batch["valid"])))
    finally:
        bar.close()
        if hasattr(it, "close"):
            it.close()
    stats = getattr(it, "stats", None)
    return _report(variants, tallies, plans, cfg, programs, seen_buckets, stats)


def _greedy_check(model, tok, batch, v: Variant, plan, pred, t: Tally) -> None:
    """Greedy-decodes one token for the batch's rows and compares it with the letter read
    from the logits and with the answer."""
    m = with_evs(model, v.evs)
    out = m.generate(batch["input_ids"], batch["attention_mask"], pixel_values_videos=batch["pixel_values_videos"],
                     reduction=plan, max_new_tokens=1)
    first = np.asarray(jax.device_get(out))[:, 0]
    for r in np.flatnonzero(batch["valid"]):
        if batch["answer"][r] < 0:
            continue
        text = tok.decode([int(first[r])]).strip()
        t.greedy_n += 1
        t.greedy_correct += int(text == LETTERS[int(batch["answer"][r])])
        t.greedy_agree += int(text == LETTERS[int(pred[r])])


def _report(variants, tallies, plans, cfg, programs, seen_buckets, stats) -> dict:
    ref = next((v for v in variants if v.name == FULL and v.evs == 0.0), None)
    rows = []
    for v in variants:
        t = tallies[v]
        row = dict(
            variant=v.label, plan=v.name, budget=v.budget, mamba_mode=v.mamba_mode, evs=v.evs,
            examples=t.n, correct=t.correct, accuracy=t.correct / t.n if t.n else None,
            per_task={k: dict(examples=c[0], accuracy=c[1] / c[0]) for k, c in sorted(t.per_task.items())},
            achieved_budget=t.budget_weighted / t.n if t.n else None,
            prefill_s=float(np.mean(t.prefill_s)) if t.prefill_s else None,
            ttft_s=float(np.mean(t.ttft_s)) if t.ttft_s else None,
            answer_frames_kept=float(np.mean(t.frames_kept)) if t.frames_kept else None,
            stages={str(b): ([] if plans[(b, v)] is None else [list(s) for s in plans[(b, v)].stages])
                    for b in cfg.buckets if seen_buckets[b]},
            greedy=dict(examples=t.greedy_n, accuracy=t.greedy_correct / t.greedy_n if t.greedy_n else None,
                        agreement=t.greedy_agree / t.greedy_n if t.greedy_n else None),
        )
        if ref is not None and t.prefill_s:
            r = tallies[ref]
            row["prefill_speedup"] = float(np.sum(r.prefill_s) / np.sum(t.prefill_s))
            row["ttft_speedup"] = float(np.sum(r.ttft_s) / np.sum(t.ttft_s))
        rows.append(row)
    return dict(
        examples=tallies[variants[0]].n,
        batch_size=cfg.batch_size,
        buckets={str(b): dict(batches=int(seen_buckets[b]), row_length=cfg.row_length(b),
                              visual_tokens=cfg.visual_tokens(b)) for b in cfg.buckets if seen_buckets[b]},
        skipped=int(getattr(stats, "skipped", 0) or 0) if stats is not None else 0,
        compile=dict(programs=programs.compilations, seconds=round(programs.compile_s, 2)),
        device=f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x{jax.device_count()}, "
               f"{os.cpu_count()} host cores",
        results=rows,
    )
