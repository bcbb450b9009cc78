"""Pipeline batches across devices and processes: NamedSharding placement on 8 fake CPU
devices (in a subprocess: the device count is fixed when JAX starts), and the lockstep
of processes whose shards hold different buckets (two simulated processes in threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np

from hybridvlm.data.pipeline import PipelineConfig, eval_pipeline, pad_to_bucket
from hybridvlm.data.records import VideoQARecord
from hybridvlm.tokenizer import byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = byte_tokenizer()
COUNTS = (1, 2, 3, 4, 5, 8, 11, 6, 2, 7, 4, 3, 8)


def _record(i: int, frames: int) -> VideoQARecord:
    rng = np.random.default_rng(i)
    return VideoQARecord(uid=f"r{i}", question=f"What color is shape {i}?", options=("red", "green", "blue"),
                         answer=i % 3, frames=rng.integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8),
                         timestamps=np.arange(frames) * 0.5)


SOURCE = [_record(i, n) for i, n in enumerate(COUNTS)]
CFG = dict(buckets=(4, 8), image_size=32, tokens_per_tubelet=4, text_tokens=160, read_threads=1, prefetch=1)

# Runs with 8 fake CPU devices: batches placed on a 1-D and a 2-D mesh.
PLACEMENT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from hybridvlm.data.pipeline import MODEL_KEYS, PipelineConfig, eval_pipeline, train_pipeline, to_device
    from tests.test_pipeline_sharding import CFG, SOURCE, TOK
    assert jax.device_count() == 8, jax.devices()
    cfg = PipelineConfig(batch_size=8, **CFG)
    host = next(iter(eval_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1))))
    mesh = jax.make_mesh((8,), ("data",))
    placed = next(iter(eval_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1), mesh=mesh)))
    for key in MODEL_KEYS:
        x = placed[key]
        assert isinstance(x, jax.Array) and x.shape == host[key].shape, key
        assert x.sharding.spec == P("data") and x.sharding.mesh.shape["data"] == 8, (key, x.sharding)
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 8 and len({s.device for s in shards}) == 8
        for r, s in enumerate(shards):
            assert s.data.shape == (1,) + host[key].shape[1:], (key, s.data.shape)
            np.testing.assert_array_equal(np.asarray(s.data), host[key][r : r + 1])
        np.testing.assert_array_equal(np.asarray(x), host[key])
    assert isinstance(placed["uid"], np.ndarray) and list(placed["uid"]) == list(host["uid"])  # host-side meta
    # 2-D mesh: rows over "data" (4), replicated over "model" (2).
    mesh2 = jax.make_mesh((4, 2), ("data", "model"))
    batch = to_device(host, mesh2)
    x = batch["pixel_values_videos"]
    assert x.sharding.spec == P("data")
    by_rows = {}
    for s in x.addressable_shards:
        assert s.data.shape[0] == 2
        by_rows.setdefault(s.index[0].start, []).append(np.asarray(s.data))
    assert sorted(by_rows) == [0, 2, 4, 6] and all(len(v) == 2 for v in by_rows.values())
    for start, (a, b) in by_rows.items():
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, host["pixel_values_videos"][start : start + 2])
    # The finetuning mesh: rows over data x fsdp (2 x 2 = 4 row groups), replicated over "tensor".
    mesh3 = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    x = to_device(host, mesh3)["input_ids"]
    assert x.sharding.spec == P(("data", "fsdp")), x.sharding
    starts = sorted(s.index[0].start for s in x.addressable_shards)
    assert starts == [0, 0, 2, 2, 4, 4, 6, 6], starts
    for s in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), host["input_ids"][s.index[0]])
    # Training batches too.
    it = iter(train_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1), mesh=mesh))
    b = next(it)
    assert b["input_ids"].sharding.spec == P("data") and b["input_ids"].shape[0] == 8
    it.close()
    print("placement ok")
""")


def test_batches_are_sharded_over_the_data_axis_of_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", PLACEMENT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "placement ok" in proc.stdout


class _Exchange:
    """process_allgather for processes simulated by threads."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots = [None] * n

    def gather_for(self, i: int):
        def gather(x):
            self.slots[i] = np.asarray(x)
            self.barrier.wait()
            out = np.stack(self.slots)
            self.barrier.wait()
            return out

        return gather


def test_processes_step_in_lockstep_through_different_buckets():
    # Shard 0 (even records) fills its 4-frame bucket first, shard 1 its 8-frame bucket; shard 1 ends first.
    source = [_record(i, n) for i, n in enumerate((2, 8, 3, 7, 8, 2, 4, 1, 5))]
    cfg = PipelineConfig(batch_size=4, **CFG)
    exchange = _Exchange(2)
    results, errors = [None, None], []

    def run(i):
        try:
            it = iter(eval_pipeline(source, cfg, tokenizer=TOK, shard=(i, 2), gather=exchange.gather_for(i)))
            results[i] = (list(it), it.stats)
        except Exception as e:  # noqa: BLE001 -- reported by the assert below
            errors.append(e)
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    (a, stats_a), (b, stats_b) = results
    assert len(a) == len(b)  # every step has a share from each process
    for x, y in zip(a, b):  # ... of one shape: the larger bucket of the two
        assert int(x["bucket"][0]) == int(y["bucket"][0])
        for key in ("input_ids", "pixel_values_videos", "labels", "timestamps"):
            assert x[key].shape == y[key].shape and x[key].shape[0] == 2
    uids = [str(u) for x in a + b for u in x["uid"][x["valid"]]]
    assert sorted(uids) == sorted(r.uid for r in source) and len(uids) == len(set(uids))
    assert stats_a.examples + stats_b.examples == len(source)
    assert [int(x["bucket"][0]) for x in a] == [8, 8, 4]
    # The two shards fill their buckets differently: some step lays a 4-frame batch out as 8 frames.
    promoted = [(x, i) for x in a + b for i in np.flatnonzero(x["valid"]) if x["num_frames"][i] <= 4
                and x["bucket"][i] == 8]
    assert sorted(str(x["uid"][i]) for x, i in promoted) == ["r0", "r2", "r5", "r7"]
    # The process whose shard ended first contributes padding-only batches.
    assert not b[-1]["valid"].any() and stats_b.padding_rows == 2 and stats_a.padding_rows == 1


def test_pad_to_bucket_keeps_each_rows_tokens_labels_and_pixels():
    cfg = PipelineConfig(batch_size=3, **CFG)
    small = next(b for b in eval_pipeline(SOURCE[:5], cfg, tokenizer=TOK, shard=(0, 1)) if b["bucket"][0] == 4)
    big = pad_to_bucket(small, 8, cfg)
    assert big["input_ids"].shape == (3, cfg.row_length(8)) and big["pixel_values_videos"].shape[1] == 4
    for r in range(3):
        np.testing.assert_array_equal(big["input_ids"][r][big["attention_mask"][r]],
                                      small["input_ids"][r][small["attention_mask"][r]])
        assert (big["input_ids"][r] == 261).sum() == cfg.visual_tokens(8)
        np.testing.assert_array_equal(big["labels"][r][big["loss_mask"][r]], small["labels"][r][small["loss_mask"][r]])
        assert big["labels"][r, -1] == small["labels"][r, -1]
    np.testing.assert_array_equal(big["pixel_values_videos"][:, :2], small["pixel_values_videos"])
    assert (big["pixel_values_videos"][:, 2:] == 0).all() and (big["bucket"] == 8).all()
    np.testing.assert_array_equal(big["timestamps"][:, :4], small["timestamps"])
    assert np.isnan(big["timestamps"][:, 4:]).all()
