"""Smoke test of eval/bench_ssd.py: every implementation's code path on tiny dims
with 1 repeat; checks rows, JSON and table fields, not timings."""

import json

import jax.numpy as jnp
import pytest
from absl import app

from eval import bench_ssd as bs

DIMS = dict(b=1, h=4, p=8, n=16, g=2, cs=16)


def test_rows_for_every_implementation_and_mode():
    rows = bs.run(list(bs.IMPLS), [40], ["fwd", "fwd_bwd"], **DIMS, dtype=jnp.float32, repeats=1,
                  max_seconds=60.0)
    got = [(r["impl"], r["mode"]) for r in rows]
    fwd = [(i, "fwd") for i in bs.IMPLS if i not in bs.BACKWARD_ONLY]
    assert got == fwd + [(i, "fwd_bwd") for i in bs.IMPLS]
    for r in rows:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["gflops_per_s"] > 0 and r["speedup_vs_chunked"] > 0
    assert all(r["speedup_vs_chunked"] == 1.0 for r in rows if r["impl"] == "chunked")
    json.dumps(rows)
    table = "\n".join(bs.format_row(r) for r in rows)
    assert "pallas_xla_bwd" in table and "1.00x" in table.splitlines()[0]


def test_slow_points_end_their_row():
    rows = bs.run(["chunked"], [16, 32], ["fwd"], **DIMS, dtype=jnp.float32, repeats=1, max_seconds=0.0)
    assert rows[0]["seconds"] > 0 and rows[1]["seconds"] is None
    assert "skipped" in bs.format_row(rows[1])


def test_unknown_implementation_is_a_usage_error():
    with pytest.raises(app.UsageError, match="triton"):
        bs.make_fn("triton", 16)


def test_flop_model_counts_chunk_and_state_work():
    assert bs.flop_model(1, 2048, 4, 8, 16, 2, 16) == 2 * bs.flop_model(1, 1024, 4, 8, 16, 2, 16)
    assert bs.flop_model(1, 1024, 4, 8, 16, 2, 32) > bs.flop_model(1, 1024, 4, 8, 16, 2, 16)
