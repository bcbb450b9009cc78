"""train/distributed.py: when `jax.distributed.initialize()` is called, and process-0-only work.

The decision logic runs with `jax.distributed.initialize` replaced by a recorder (a real
call cannot be undone in the test process); one test starts a real two-process job on
localhost (CPU, a coordinator on a free port) in subprocesses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Variables JAX's cluster detection reads (SLURM, Open MPI, Kubernetes, GKE TPU), plus ours.
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
                "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def calls(monkeypatch):
    """A clean environment and a recording `jax.distributed.initialize` (kwargs of each call);
    once "initialised", the process reports index 1 of 2."""
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    made = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
    monkeypatch.setattr(jax, "process_index", lambda: 1 if made else 0)
    monkeypatch.setattr(jax, "process_count", lambda: 2 if made else 1)
    return made


def test_alone_without_environment_it_does_not_initialise(calls):
    assert distributed.detected_cluster() is None
    assert not distributed.multi_process_requested()
    assert distributed.maybe_initialize(None) == (0, 1)
    assert distributed.maybe_initialize() == (0, 1)
    assert calls == []


def test_disabled_never_initialises_even_in_a_cluster(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.multi_process_requested()
    assert distributed.maybe_initialize(False) == (0, 1)
    assert calls == []


def test_coordinator_address_initialises_with_the_count_and_id_given(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.maybe_initialize(None) == (1, 2)
    # JAX reads the address itself; the count and id are passed on.
    assert calls == [dict(num_processes=2, process_id=1)]


def test_enabled_initialises_and_leaves_the_arguments_to_jax(calls):
    assert distributed.maybe_initialize(True) == (1, 2)
    assert calls == [{}]


def test_a_multi_task_slurm_job_initialises_a_single_task_one_does_not(calls, monkeypatch):
    for var, value in dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="node[001-002]", SLURM_NTASKS="1",
                           SLURM_PROCID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(var, value)
    assert distributed.detected_cluster().__name__ == "SlurmCluster"  # JAX's own detection
    assert distributed.maybe_initialize(None) == (0, 1) and calls == []
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.maybe_initialize(None) == (1, 2) and calls == [{}]


def test_never_initialises_twice(calls, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert distributed.maybe_initialize(True) == (3, 4)
    assert calls == []


def test_bad_process_id_names_the_variable(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' is not an integer"):
        distributed.maybe_initialize(None)


def test_on_primary_runs_only_on_process_zero(monkeypatch):
    ran = []
    assert distributed.is_primary()
    assert distributed.on_primary(lambda x, y=0: ran.append(x + y) or "done", 1, y=2) == "done"
    assert distributed.on_primary(lambda: "alone", barrier="skipped when alone") == "alone"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not distributed.is_primary()
    assert distributed.on_primary(lambda: ran.append("elsewhere")) is None
    assert ran == [3]


CHILD = textwrap.dedent("""
    from train import distributed
    index, count = distributed.maybe_initialize(None)
    import jax
    out = distributed.on_primary(lambda: "wrote", barrier="after_primary")
    print("RESULT", index, count, jax.process_count(), jax.device_count(), distributed.is_primary(), out, flush=True)
""")


def test_two_processes_on_localhost_see_each_other(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [next((line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")), out) for out in outs]
    assert results == [["0", "2", "2", "2", "True", "wrote"], ["1", "2", "2", "2", "False", "None"]], outs
