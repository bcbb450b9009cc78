"""train.checkpoint: bitwise round trips of a train state (params, AdamW state, step, typed
PRNG key) with the config and the data iterator, retention and save schedule, crash safety
(an unfinished save is never the latest: by hand and by a real kill -9 mid-save), SIGTERM
handling, and restoring a state saved on 8 devices onto 4 devices and onto 1 (in one
subprocess with 8 fake CPU devices, which also runs JAX's multi-host preemption service)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.checkpoint import (TMP_SUFFIX, PreemptionGuard, TrainCheckpointer, abstract_of, install_sigterm_handler,
                              preemption_guard, preemption_service_active)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"steps": 10, "batch_size": 2, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "init": None,
          "reduction": {"shape": "paper", "budget": 0.25}}


OPTIMIZER = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10), weight_decay=0.1)


@jax.jit  # one compilation instead of dozens of eager ones
def _two_adamw_steps(params):
    opt_state = OPTIMIZER.init(params)
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.sin(p) * 0.1, params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def train_state(seed: int = 0, *, step: int = 4) -> dict:
    """A train-state-like pytree: float32 params, an AdamW state after two updates (so its
    moments are not trivial), an int32 step and typed PRNG keys of two implementations."""
    rng = np.random.default_rng(seed)
    params = {"embed": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
              "blocks": [{"w": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32),
                          "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}]}
    params, opt_state = _two_adamw_steps(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32),
            "rng": jax.random.fold_in(jax.random.key(seed), 7), "rbg": jax.random.key(seed, impl="rbg")}


def assert_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, (jax.tree_util.keystr(path), x.dtype, y.dtype)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        # Compare the bytes: equal values are not enough (-0.0, NaN payloads).
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def test_round_trip_is_bitwise_with_the_config(tmp_path):
    state = train_state(1)
    with TrainCheckpointer(tmp_path, save_every=2, keep=3) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore(abstract_state=abstract_of(state))
        assert ckpt.maybe_save(4, state, config=CONFIG)
    # A new checkpointer, as a restarted job makes; the target comes from jax.eval_shape
    # (typed key dtypes included) plus the layout wanted now.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            jax.eval_shape(lambda: train_state(1)))
    with TrainCheckpointer(tmp_path, save_every=2, keep=3) as ckpt:
        assert ckpt.latest_step() == 4
        restored, config = ckpt.restore(abstract_state=abstract)
        assert config == CONFIG
        assert_bitwise_equal(restored, state)
        assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
        # Same keys, same random stream.
        np.testing.assert_array_equal(jax.random.normal(restored["rng"], (3,)), jax.random.normal(state["rng"], (3,)))
        # abstract_state must carry shardings: a plain shape/dtype target is refused.
        with pytest.raises(TypeError, match="sharding"):
            ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
        with pytest.raises(FileNotFoundError):
            ckpt.restore(3, abstract_state=abstract)
    # The config item is plain JSON on disk.
    with open(tmp_path / "4" / "config" / os.listdir(tmp_path / "4" / "config")[0]) as f:
        assert json.load(f) == CONFIG


def test_save_every_force_and_keep_the_last_k(tmp_path):
    state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
    with TrainCheckpointer(tmp_path, save_every=3, keep=2) as ckpt:
        saved = [step for step in range(1, 11) if ckpt.maybe_save(step, state)]
        assert saved == [3, 6, 9]  # no save of the first step, unlike Orbax's default policy
        assert ckpt.maybe_save(10, state, force=True)  # e.g. the last step of the run
        assert not ckpt.maybe_save(10, state, force=True)  # already saved: no error, no save
        assert not ckpt.maybe_save(9, state, force=True)  # older than the latest
        assert not ckpt.maybe_save(11, state)  # the interval still applies
        ckpt.wait()
        assert ckpt.all_steps() == [9, 10] and ckpt.latest_step() == 10
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]
    with pytest.raises(ValueError):
        TrainCheckpointer(tmp_path, save_every=0, keep=1)


def test_an_unfinished_save_is_never_the_latest(tmp_path):
    state = train_state(2, step=2)
    with TrainCheckpointer(tmp_path, save_every=2, keep=5) as ckpt:
        ckpt.maybe_save(2, state)
    # What a save killed before its commit leaves behind in Orbax 0.12: the step's items
    # written (or half written) into `<step>.orbax-checkpoint-tmp`, never renamed to `<step>`.
    done = tmp_path / "2"
    partial = tmp_path / f"4{TMP_SUFFIX}"
    os.makedirs(partial / "state")
    for name in os.listdir(done / "state"):
        if not os.path.isdir(done / "state" / name):
            (partial / "state" / name).write_bytes((done / "state" / name).read_bytes()[:10])
    with TrainCheckpointer(tmp_path, save_every=2, keep=5) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        restored, config = ckpt.restore(abstract_state=abstract_of(state))
        assert config is None
        assert_bitwise_equal(restored, state)
        # Resuming from 2 reaches step 4 again and saves it over the stale folder.
        later = train_state(3, step=4)
        assert ckpt.maybe_save(4, later)
        ckpt.wait()
        assert ckpt.latest_step() == 4
        assert_bitwise_equal(ckpt.restore(abstract_state=abstract_of(later))[0], later)
    assert sorted(os.listdir(tmp_path)) == ["2", "4"]


def test_the_data_iterator_continues_with_the_next_element(tmp_path):
    def make():
        return iter(grain.MapDataset.range(40).shuffle(seed=5).batch(3).to_iter_dataset())

    it = make()
    for _ in range(4):
        next(it)
    state = train_state(4)
    with TrainCheckpointer(tmp_path, save_every=4, keep=2) as ckpt:
        assert ckpt.maybe_save(4, state, data_iter=it, config=CONFIG)
        # The save is asynchronous, but the iterator position is taken by the call: moving
        # on at once (as the loop does) does not change what was saved.
        expected = [next(it) for _ in range(3)]
        assert ckpt.maybe_save(5, state, force=True)  # a step saved without an iterator
    with TrainCheckpointer(tmp_path, save_every=4, keep=2) as ckpt:
        fresh = make()
        restored, config = ckpt.restore(4, abstract_state=abstract_of(state), data_iter=fresh)
        assert config == CONFIG
        for want in expected:
            np.testing.assert_array_equal(next(fresh), want)
        assert_bitwise_equal(restored, state)
        with pytest.raises(FileNotFoundError, match="iterator"):
            ckpt.restore(5, abstract_state=abstract_of(state), data_iter=make())


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back(tmp_path):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        assert not preemption_service_active()  # no jax.distributed in this process
        with preemption_guard() as guard:
            assert not guard.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
            assert guard.should_stop() and guard.received == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)  # a second notice changes nothing
            assert guard.should_stop()
        assert signal.getsignal(signal.SIGTERM) is previous and calls == []
        guard = install_sigterm_handler()
        assert signal.getsignal(signal.SIGTERM) == guard._handle
        guard.uninstall()
        assert signal.getsignal(signal.SIGTERM) is previous

        # A loop that gets the notice at step 5 saves there (off the interval) and stops.
        state = {"w": jnp.zeros(3), "step": jnp.int32(0)}
        with TrainCheckpointer(tmp_path, save_every=100, keep=2) as ckpt, PreemptionGuard() as guard:
            for step in range(1, 50):
                state = {"w": state["w"] + 1, "step": jnp.int32(step)}
                if step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                stop = guard.should_stop(step)
                ckpt.maybe_save(step, state, force=stop)
                if stop:
                    break
            assert step == 5
        with TrainCheckpointer(tmp_path, save_every=100, keep=2) as ckpt:
            assert ckpt.latest_step() == 5
            assert int(ckpt.restore(abstract_state=abstract_of(state))[0]["step"]) == 5
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


# Runs with 8 fake CPU devices under a one-process jax.distributed (so JAX's preemption
# service runs), and ends by killing itself with SIGKILL in the middle of an async save.
MESHES = textwrap.dedent("""
    import os, signal, socket, sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
    from tests.test_train_checkpoint import CONFIG, assert_bitwise_equal, train_state
    from train.checkpoint import TMP_SUFFIX, TrainCheckpointer, abstract_of, preemption_guard, preemption_service_active
    assert jax.device_count() == 8, jax.devices()
    workdir = sys.argv[1]

    def specs(state, axis, tensor=None):
        # Shard every float array's first dimension over `axis` (and a 2-D one's second over
        # `tensor`); scalars and keys are replicated.
        def spec(x):
            if x.ndim == 0 or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return P()
            return P(axis, tensor) if x.ndim == 2 and tensor else P(axis)
        return jax.tree.map(spec, state)

    host = train_state(6)
    mesh8 = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    state = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh8, s)), host, specs(host, "fsdp", "tensor"))
    w = state["params"]["blocks"][0]["w"]
    assert len({sh.device for sh in w.addressable_shards}) == 8 and w.addressable_shards[0].data.shape == (1, 2)
    with TrainCheckpointer(workdir, save_every=2, keep=3) as ckpt:
        assert ckpt.maybe_save(2, state, config=CONFIG)

    with TrainCheckpointer(workdir, save_every=2, keep=3) as ckpt:
        mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[4:])
        targets = {
            "4 devices": jax.tree.map(lambda s: NamedSharding(mesh4, s), specs(host, "data")),
            "1 device": jax.tree.map(lambda s: SingleDeviceSharding(jax.devices()[5]), specs(host, "data")),
        }
        for name, shardings in targets.items():
            abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), host, shardings)
            restored, config = ckpt.restore(abstract_state=abstract)
            assert config == CONFIG
            for x, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
                assert x.sharding == sh, (name, x.sharding, sh)
            assert_bitwise_equal(restored, host)
            print("restored onto", name, flush=True)

    # Preemption under jax.distributed: JAX's service owns SIGTERM and picks the step all
    # processes stop at; Orbax saves there without force (the interval is out of reach).
    with TrainCheckpointer(workdir, save_every=10**9, keep=3) as ckpt:
        assert preemption_service_active()
        before = signal.getsignal(signal.SIGTERM)
        with preemption_guard() as guard:
            assert signal.getsignal(signal.SIGTERM) == before  # no Python handler on top of JAX's
            os.kill(os.getpid(), signal.SIGTERM)
            for step in range(3, 3000):
                time.sleep(0.01)  # a train step; the processes agree on a stop step meanwhile
                stop = guard.should_stop(step)
                saved = ckpt.maybe_save(step, state)
                assert saved == stop, (step, saved, stop)
                if stop:
                    break
        assert ckpt.latest_step() == step
        print("preemption sync point at step", step, flush=True)

    # kill -9 in the middle of an asynchronous save of a 64 MiB state.
    big = jax.device_put(jnp.arange(16 * 2**20, dtype=jnp.float32), NamedSharding(mesh8, P("fsdp")))
    ckpt = TrainCheckpointer(workdir, save_every=1, keep=10)
    assert ckpt.maybe_save(100_000, {"big": big})
    print("killing", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_restore_onto_other_meshes_preemption_sync_and_kill_9_mid_save(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESHES, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, proc.stderr[-4000:])
    assert "restored onto 4 devices" in out and "restored onto 1 device" in out and "killing" in out, out
    preempted = int(out.split("preemption sync point at step ")[1].split()[0])
    # The save killed mid-way left only its temporary folder; the latest is the last commit.
    assert os.path.isdir(tmp_path / f"100000{TMP_SUFFIX}") and not os.path.exists(tmp_path / "100000")
    with TrainCheckpointer(tmp_path, save_every=2, keep=3) as ckpt:
        assert ckpt.latest_step() == preempted and ckpt.all_steps() == [2, preempted]
        host = train_state(6)
        restored, config = ckpt.restore(abstract_state=abstract_of(host))  # saved on 8 devices, back on 1
        assert config is None
        assert_bitwise_equal(restored, host)
        assert_bitwise_equal(ckpt.restore(2, abstract_state=abstract_of(host))[0], host)
    assert not os.path.exists(tmp_path / f"100000{TMP_SUFFIX}")  # cleaned up on start
