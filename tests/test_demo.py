"""The README's main job: `python -m eval.demo` on the embedded default."""

import json
import os
import shutil
import subprocess
import sys

from configs import tiny_lm
from eval import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nemotron_h", "hybrid_g2")


def test_demo_cli_runs_on_embedded_default(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.demo", "--json", str(out), "--config.max_new_tokens=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNTRAINED" in proc.stdout and "prefill" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["answer_ids"]) == 5
    assert result["prefill_s"] > 0


def test_demo_with_checkpoint_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    vocab = {f"w{i}": i for i in range(256)}
    vocab["[UNK]"] = 3
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    cfg = tiny_lm.get_config()
    cfg.max_new_tokens = 4
    result = demo.run(cfg, str(ckpt), prompt="w5 w17 w33")
    assert result["model"] == str(ckpt)
    assert result["prompt_tokens"] == 4  # bos + 3 words
    assert len(result["answer_ids"]) == 4
    assert all(0 <= t < 256 for t in result["answer_ids"])
