"""The demo's default question: a SynthVideoQA clip answered with the full and the reduced prefill.

    record = pick_example(seed, num_frames=16, frame_size=64)     # a fresh clip and question per seed
    print("\\n".join(describe_clip(record)))                        # the clip, event by event
    result = answer_full_and_reduced(model, tok, record, plan="progressive", budget=0.25)

Both answers are read from the logits over the option letters at the prompt's last position
(the way `eval.videoqa` scores), from programs compiled ahead and warmed up, so the prefill
times compare like with like: the LM prefill over all visual tokens against the same prefill
under the paper's progressive plan (the vision tower, shared by both, is timed apart).
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

from eval.qa_harness import letter_predictions, row_lengths
from eval.qa_programs import QAPrograms
from eval.qa_variants import FULL, Variant
from hybridvlm import atomic
from hybridvlm.data import synth
from hybridvlm.data.layout import MODEL_KEYS, collate
from hybridvlm.data.pipeline import PipelineConfig, answer_token_ids
from hybridvlm.data.pipeline_example import PrepareExample, Skipped
from hybridvlm.data.records import LETTERS, VideoQARecord
from hybridvlm.vlm import NemotronHVLModel

REPEATS = 3  # timed calls per program (the median is reported)


def pick_example(seed: int, *, num_frames: int, frame_size: int) -> VideoQARecord:
    """One SynthVideoQA example drawn from `seed` (its index, hence its task, too)."""
    index = int(np.random.default_rng(seed).integers(0, 2**31 - 1))
    return synth.generate(seed, index, num_frames=num_frames, size=frame_size)


def describe_clip(record: VideoQARecord) -> list[str]:
    """The clip as text: one line per event, "  0.0-1.5 s  red circle"."""
    lines = []
    for start, length, shape, color in np.asarray(record.meta["events"]).tolist():
        t0, t1 = start / synth.FPS, (start + length - 1) / synth.FPS
        what = "(blank)" if shape < 0 else f"{synth.COLORS[color]} {synth.SHAPES[shape]}"
        lines.append(f"  {t0:5.1f}-{t1:5.1f} s  {what}")
    return lines


def save_contact_sheet(record: VideoQARecord, path: str, columns: int = 8) -> None:
    """A PNG grid of the clip's frames, each titled with its time (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = record.frames
    rows = -(-len(frames) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.2, rows * 1.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(frames):
            ax.imshow(frames[i])
            ax.set_title(f"{record.timestamps[i]:.1f} s", fontsize=7)
    fig.tight_layout()
    atomic.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def answer_full_and_reduced(model: NemotronHVLModel, tok, record: VideoQARecord, *, plan: str = "progressive",
                            budget: float = 0.25) -> dict:
    """Answers `record` with the full prefill and with `plan` at `budget`.

    Returns the prompt's token counts, the correct letter and option, and per run
    ("full", "reduced"): the letter and option chosen, whether it is right, the visual
    tokens kept before each reduction stage, and the median LM prefill and vision times.
    PlanError when the plan cannot meet the budget for this video's tokens."""
    vc = model.config
    frames = len(record.frames)
    bucket = -(-frames // vc.temporal_patch_size) * vc.temporal_patch_size
    base = PipelineConfig.for_model(vc, batch_size=1, buckets=(bucket,), max_frames=frames)
    cfg = dataclasses.replace(base, row_lengths=(row_lengths([record], base, tok)[bucket],))
    example = PrepareExample(cfg, tok, train=False)(record)
    if isinstance(example, Skipped):
        raise ValueError(f"{record.uid}: {example.reason}")
    batch = collate([example], bucket, cfg, rows=1)
    inputs = {k: batch[k] for k in MODEL_KEYS}
    num_visual = cfg.visual_tokens(bucket)
    runs = {"full": Variant(FULL, 1.0, None), "reduced": Variant(plan, budget, "decay_free")}
    plans = {k: v.plan(vc.text.num_layers, num_visual) for k, v in runs.items()}
    programs = QAPrograms(model, answer_token_ids(tok))
    for k, v in runs.items():
        programs.compile(bucket, inputs, v, plans[k])
    embedded, _ = programs.embed(bucket, 0.0, inputs)  # warm-up
    vision_s = statistics.median(programs.embed(bucket, 0.0, inputs)[1] for _ in range(REPEATS))
    out = dict(prompt_tokens=int(example.ids.size), visual_tokens=num_visual, vision_s=vision_s,
               answer=record.answer_letter, answer_option=record.options[record.answer], plan=plan, budget=budget)
    for k, v in runs.items():
        programs.prefill(bucket, v, embedded)  # warm-up
        timed = [programs.prefill(bucket, v, embedded) for _ in range(REPEATS)]
        letter_logits = np.asarray(timed[-1][0][0])
        choice = int(letter_predictions(letter_logits, batch["num_options"])[0])
        p = plans[k]
        out[k] = dict(letter=LETTERS[choice], option=record.options[choice], correct=choice == record.answer,
                      prefill_s=statistics.median(t for _, t in timed),
                      stages=[] if p is None else [list(s) for s in p.stages],
                      achieved_budget=1.0 if p is None else p.achieved_budget)
    return out
