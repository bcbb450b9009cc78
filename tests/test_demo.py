"""The README's main job: `python -m eval.demo` (embedded default, LM and VLM checkpoints)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import tiny_vlm
from eval import demo

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
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.demo", "--json", str(out), "--config.max_new_tokens=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNTRAINED" in proc.stdout and "prefill" in proc.stdout
    r = json.loads(out.read_text())
    cfg = tiny_vlm.get_config()
    assert r["generated_clip"] and r["frames"] == cfg.max_frames
    # 16 frames -> 8 tubelets x (128 / 16)^2 / 4 tokens.
    assert r["visual_tokens"] == 8 * 16
    assert len(r["answer_ids"]) == 5 and r["prefill_s"] > 0
    assert np.all(np.diff(r["timestamps"]) > 0)


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
