"""eval.videoqa: the accuracy harness (answers, compile-once programs, kept frames, CLI)."""


import jax
import numpy as np
import pytest
from flax import nnx

from configs import synth_video_qa_tiny
from eval import qa_harness, videoqa
from eval.qa_harness import answer_frames_kept, open_records, run_videoqa
from eval.qa_variants import Variant, build_variants
from hybridvlm.data import synth
from hybridvlm.data.pipeline import PipelineConfig
from hybridvlm.tokenizer import synth_tokenizer
from hybridvlm.vlm import NemotronHVLModel
from train.model import save_model, vlm_config

TOK = synth_tokenizer()


def tiny_config():
    """configs/synth_video_qa_tiny.py shrunk: 32x32 frames, patch 8 -> 4 tokens per tubelet."""
    cfg = synth_video_qa_tiny.get_config()
    cfg.model.image_size = 32
    cfg.model.vision.update(max_img_size=32, patch_size=8, hidden_size=32, num_heads=2)
    cfg.model.text.update(hidden_size=32, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16, head_dim=16,
                          num_attention_heads=2, ssm_state_size=8)
    cfg.model.projector_hidden_size = 64
    return cfg


def always_a(model: NemotronHVLModel) -> NemotronHVLModel:
    """Rewires the LM so that it answers "A" whatever it sees: every layer's output
    projection is zeroed (the residual stream keeps each token's embedding), and the head's
    column of "A" is made the last prompt token's (".") normalised embedding, scaled up."""
    lm = model.language_model
    for layer in lm.layers:
        for name in ("out_proj", "o", "down"):
            if hasattr(layer.mixer, name):
                p = getattr(layer.mixer, name)
                p.set_value(np.zeros_like(p[...]))
    dot, a = TOK.token_to_id("."), TOK.encode("A", add_special_tokens=False).ids[0]
    e = np.asarray(lm.embed[...][dot])
    head = np.asarray(lm.lm_head[...]).copy()
    head[:, a] = 50.0 * e / np.linalg.norm(e)
    lm.lm_head.set_value(head)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cfg = tiny_config()
    random_dir = str(tmp_path_factory.mktemp("videoqa") / "random")
    model = NemotronHVLModel(vlm_config(cfg.model), rngs=nnx.Rngs(0))
    save_model(model, TOK, random_dir)
    forced_dir = str(tmp_path_factory.mktemp("videoqa") / "always_a")
    save_model(always_a(NemotronHVLModel(vlm_config(cfg.model), rngs=nnx.Rngs(1))), TOK, forced_dir)
    return dict(random=random_dir, forced=forced_dir, config=cfg)


def _load(path):
    import hybridvlm

    return hybridvlm.from_pretrained(path), hybridvlm.load_tokenizer(path)


def test_a_model_that_always_answers_a_scores_the_share_of_a(models):
    model, tok = _load(models["forced"])
    records = open_records("synth:validation", seed=3, num_examples=10, frames=[16], frame_size=32)
    share_a = np.mean([r.answer == 0 for r in records])
    assert 0 < share_a < 1, "the sample must hold both A and other answers"
    variants = build_variants(["full", "progressive"], [0.5])
    report = run_videoqa(model, tok, records, variants, batch_size=4, buckets=[16], greedy_batches=1,
                         progress=False)
    first = [records[i] for i in range(4)]  # the first batch: greedy-decoded too
    for row in report["results"]:
        assert row["examples"] == 10
        assert row["accuracy"] == pytest.approx(share_a)
        for task, cell in row["per_task"].items():
            want = np.mean([r.answer == 0 for r in records if r.task == task])
            assert cell["accuracy"] == pytest.approx(want), task
        # Greedy decoding reads the same first token: it says "A" too.
        assert row["greedy"]["examples"] == 4 and row["greedy"]["agreement"] == 1.0
        assert row["greedy"]["accuracy"] == pytest.approx(np.mean([r.answer == 0 for r in first]))


def test_programs_compile_once_per_bucket_and_plan(models, monkeypatch, tmp_path):
    model, tok = _load(models["random"])
    compiles = []
    original = jax.stages.Lowered.compile

    def counting(self, *a, **k):
        compiles.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(jax.stages.Lowered, "compile", counting)
    records = open_records("synth:test", seed=0, num_examples=8, frames=[16, 32], frame_size=32)
    variants = build_variants(["full", "progressive", "uniform"], [0.5])
    report = run_videoqa(model, tok, records, variants, batch_size=2, buckets=[16, 32], greedy_batches=0,
                         progress=False)
    buckets = report["buckets"]
    assert sorted(buckets) == ["16", "32"] and all(b["batches"] == 2 for b in buckets.values())
    # Per bucket: one vision program and one prefill program per variant, whatever the batches.
    assert len(compiles) == report["compile"]["programs"] == 2 * (1 + len(variants))
    full = next(r for r in report["results"] if r["plan"] == "full")
    assert full["prefill_speedup"] == 1.0 and full["achieved_budget"] == 1.0
    prog = next(r for r in report["results"] if r["plan"] == "progressive")
    assert prog["achieved_budget"] == pytest.approx(0.5, abs=0.05)
    assert set(prog["stages"]) == {"16", "32"} and all(prog["stages"].values())
    assert 0.0 <= prog["answer_frames_kept"] <= 1.0 and full["answer_frames_kept"] == 1.0
    # The CLI's outputs of such a report: the terminal table and the plot.
    report.update(model="tiny", data="synth:test")
    lines = videoqa.summary_lines(report)
    assert len(lines) == 1 + len(variants) and lines[1].startswith("full") and "1.00x" in lines[1]
    png = tmp_path / "acc.png"
    videoqa.plot(report, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_answer_frames_kept_counts_frames_with_a_surviving_token():
    cfg = PipelineConfig(batch_size=2, buckets=(4,), image_size=16, temporal_patch=2, tokens_per_tubelet=2,
                         image_token_id=9)
    img = 9
    # Row 0: 2 tubelets (4 frames) of 2 tokens each at columns 2,3 and 5,6; text elsewhere.
    ids = np.array([[0, 1, img, img, 1, img, img, 1],
                    [0, 0, img, img, img, img, 1, 1]])
    mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]], bool)  # row 1: tubelet 0 masked (padding)
    batch = dict(input_ids=ids, attention_mask=mask, valid=np.array([True, True]), num_frames=np.array([4, 2]),
                 meta=[dict(answer_frames=np.array([False, True, False, True])),
                       dict(answer_frames=np.array([True, False]))])
    # Row 0 keeps a token of tubelet 1 only (column 6): answering frames 1 (tubelet 0) and 3 (tubelet 1).
    # Row 1's real tubelet is at columns 4, 5; column 5 survives: its answering frame 0 is kept.
    kept = np.array([[1, 4, 6, 7], [3, 5, 6, 7]])
    assert answer_frames_kept(batch, kept, cfg) == [0.5, 1.0]
    kept = np.array([[1, 2, 4, 7], [3, 6, 7, 7]])
    assert answer_frames_kept(batch, kept, cfg) == [0.5, 0.0]


def test_variant_grid_labels_and_budgets():
    vs = build_variants(["uniform", "progressive", "full"], [0.25, 0.5], mamba_modes=["decay_free", "decay"],
                        evs=[0.0, 0.5])
    labels = [v.label for v in vs]
    assert labels[0] == "full" and len(labels) == len(set(labels))
    # uniform ignores the Mamba mode: one variant per budget; progressive gets both modes.
    assert sum(v.name == "uniform" and v.evs == 0 for v in vs) == 2
    assert "progressive@0.25/decay" in labels and "progressive@0.5+evs0.5" in labels and "full+evs0.5" in labels
    v = Variant("progressive", 0.5, "decay_free", 0.5)
    plan = v.plan(num_layers=9, num_visual=v.lm_visual(tubelets=8, tokens_per_tubelet=16))
    assert plan.num_visual == 64  # EVS at 0.5 keeps half of 128 (the first tubelet whole)
    assert v.overall_budget(plan, 8, 16) == pytest.approx(0.5 * plan.achieved_budget)
    with pytest.raises(ValueError, match="unknown plan"):
        build_variants(["fastest"], [0.5])
    with pytest.raises(ValueError, match="budget"):
        build_variants(["fastv"], [1.5])


def test_open_records_mixes_lengths_and_reads_the_split():
    recs = open_records("synth:test", seed=2, num_examples=6, frames=[16, 32], frame_size=16)
    assert [len(r.frames) for r in recs] == [16, 32, 16, 32, 16, 32]
    same = synth.generate(synth.split_seed(2, "test"), 1, num_frames=32, size=16)
    assert recs[1].uid == same.uid and np.array_equal(recs[1].frames, same.frames)
    with pytest.raises(ValueError, match="synth:SPLIT"):
        qa_harness.open_records("synth", seed=0, num_examples=2, frames=[16], frame_size=16)
