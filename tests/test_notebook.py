"""notebooks/hybridvlm_colab.ipynb runs top to bottom on CPU (its small settings).

Its code cells run in order in one fresh Python process (one namespace, as a kernel
would), from the repository root, where hybridvlm is installed: the install cell then
installs nothing, and every later cell runs the project's CLIs and checks their files.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "hybridvlm_colab.ipynb")

# After the last cell: every file the cells said they made exists and holds what they promise.
CHECKS = """
import json as _json, os as _os
assert _os.path.exists(clip) and open(clip, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n", clip
assert any(n.endswith(".png") for n in _os.listdir(out)), out
_report = _json.load(open(report))
assert _report["examples"] == S["examples"], _report["examples"]
# `full` is always scored too: the reference of the speedups.
assert [(r["plan"], r["budget"]) for r in _report["results"]] == [("full", 1.0), ("progressive", 0.5)]
assert _os.path.exists(plot) and _os.path.exists(_os.path.join(RUN, "model"))
assert _json.load(open(bench))
print("NOTEBOOK-OK")
"""


def _code_cells() -> list[str]:
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_cells_are_plain_python():
    # Colab runs them as they are; no shell magics, so a plain interpreter can run them too.
    cells = _code_cells()
    assert len(cells) >= 6
    for src in cells:
        ast.parse(src)
        assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines())


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(_code_cells()) + "\n" + CHECKS)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
    p = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "NOTEBOOK-OK" in p.stdout
