"""The README's main job: `python -m eval.demo` (embedded default, LM and VLM checkpoints)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import tiny_vlm
from eval import demo, demo_synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def word_tokenizer(path, specials=()):
    """Words w0..w249 -> ids 0..249, [UNK] 253; `specials` (token, id) pairs kept whole."""
    vocab = {f"w{i}": i for i in range(250)}
    vocab["[UNK]"] = 253
    for token, i in specials:
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t, _ in specials])
    tok.save(str(path))


def test_demo_cli_runs_on_embedded_default(tmp_path):
    out, png = tmp_path / "demo.json", tmp_path / "clip.png"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.demo", "--json", str(out), "--clip_out", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    shipped = demo.default_checkpoint() is not None
    if not shipped:
        assert "UNTRAINED" in proc.stdout
    # The question is SynthVideoQA's example of the printed seed, shown with its correct answer.
    cfg = tiny_vlm.get_config()
    assert f"--seed {r['seed']} repeats it" in proc.stdout
    record = demo_synth.pick_example(r["seed"], num_frames=cfg.max_frames, frame_size=r["frame_size"])
    assert r["uid"] == record.uid and r["question"] == record.text() and r["answer"] == record.answer_letter
    assert record.question in proc.stdout and f"correct  : {record.answer_letter}." in proc.stdout
    assert len(r["events"]) == len(record.meta["events"]) and png.read_bytes()[:4] == b"\x89PNG"
    # Full and reduced prefill side by side: the reduced one keeps fewer tokens stage by stage.
    assert r["full"]["stages"] == [] and r["full"]["achieved_budget"] == 1.0
    keeps = [k for _, k in r["reduced"]["stages"]]
    assert keeps and keeps == sorted(keeps, reverse=True) and keeps[0] < r["visual_tokens"]
    assert abs(r["reduced"]["achieved_budget"] - 0.25) < 0.02
    for k in ("full", "reduced"):
        assert r[k]["letter"] in "ABCD" and r[k]["prefill_s"] > 0
        assert r[k]["correct"] == (r[k]["letter"] == record.answer_letter)
        assert f"answer {r[k]['letter']}." in proc.stdout


def test_each_run_draws_a_new_question_and_a_seed_repeats_it():
    seeds = {demo.new_seed() for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**31 for s in seeds)
    a, b = (demo_synth.pick_example(s, num_frames=16, frame_size=32) for s in sorted(seeds)[:2])
    assert a.uid != b.uid
    again = demo_synth.pick_example(sorted(seeds)[0], num_frames=16, frame_size=32)
    assert again.uid == a.uid and again.text() == a.text() and np.array_equal(again.frames, a.frames)


def test_demo_with_vlm_checkpoint_and_video(tmp_path):
    from hybridvlm.video import write_test_clip

    ckpt = tmp_path / "vlm"
    shutil.copytree(os.path.join(FIXTURES, "vlm", "omni_video"), ckpt)
    word_tokenizer(ckpt / "tokenizer.json", specials=(("<image>", 250), ("<img>", 251), ("</img>", 252)))
    video = tmp_path / "clip.avi"
    write_test_clip(str(video), num_frames=30, fps=10)
    cfg = tiny_vlm.get_config()
    cfg.max_frames, cfg.max_new_tokens = 6, 3
    r = demo.run(cfg, str(ckpt), video=str(video), question="w5 w17")
    assert r["model"] == str(ckpt) and r["frames"] == 6
    # 6 frames -> 3 tubelets x (32 / 8)^2 / 4 = 4 tokens each.
    assert r["visual_tokens"] == 12
    assert len(r["answer_ids"]) == 3 and all(0 <= t < 256 for t in r["answer_ids"])


def test_demo_with_text_only_checkpoint(tmp_path):
    ckpt = tmp_path / "lm"
    shutil.copytree(os.path.join(FIXTURES, "nemotron_h", "hybrid_g2"), ckpt)
    word_tokenizer(ckpt / "tokenizer.json")
    cfg = tiny_vlm.get_config()
    cfg.max_new_tokens = 4
    r = demo.run(cfg, str(ckpt), question="w5 w17 w33")
    assert r["prompt_tokens"] == 4 and r["visual_tokens"] == 0  # bos + 3 words
    assert len(r["answer_ids"]) == 4


def test_demo_with_image(tmp_path):
    from hybridvlm.video import synthetic_frame, write_image

    image = tmp_path / "frame.png"
    write_image(str(image), synthetic_frame(3, 10, 96, 80))
    cfg = tiny_vlm.get_config()
    cfg.max_new_tokens = 3
    r = demo.run(cfg, image=str(image), question="what is this?")
    # one 128x128 image -> (128 / 16)^2 / 4 tokens
    assert r["image"] == str(image) and r["visual_tokens"] == 16
    assert len(r["answer_ids"]) == 3
