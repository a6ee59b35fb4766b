"""--distribution=multi_worker: two worker processes on 127.0.0.1 train as one device.

Each test starts its workers as users do (``python -m dgm_tf.main`` with ``TF_CONFIG``),
on free ports of 127.0.0.1, every wait bounded in time. Worker 0 is the chief (the
cluster has no ``chief`` task); it alone writes ``--workdir``, worker 1 trains into a
temporary directory under ``TMPDIR`` (the test's own, checked empty at the end).
"""

import json
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from dgm_tf.checkpoint import CheckpointManager
from tests.test_cli import REPO, cli_command
from tests.test_distribute import DGM_MOVED_FRACTION, DGM_WEIGHT_MAX, WEIGHT_ATOL

# tests/distribute_driver.py's DGM run, as flags: 2 one-class tasks of 32 images,
# batches of 16 (8 rows per replica), the generator grown for task 2.
DGM_FLAGS = [
    "--method=dgmw", "--class_order=1,7", "--epochs=2", "--train_examples_per_class=32", "--batch_size=16",
    "--ndf=4", "--eval_every=1", "--samples_per_class=2", "--lr_d=0.01", "--log_every_steps=1",
    "--nz=16", "--ngf=4", "--smax=10",
]
# The same run with MAS (a classifier with a growing head and a penalty): the cluster's
# mechanics at a quarter of DGM's tracing time.
MAS_FLAGS = [
    "--method=mas", "--class_order=1,7", "--epochs=2", "--train_examples_per_class=32", "--batch_size=16",
    "--ndf=4", "--eval_every=1", "--samples_per_class=2", "--lr_d=0.01", "--mas_lambda=100", "--log_every_steps=1",
]
# Dynamos on the same two tasks: the first epoch is the ungated warm-up, then every step
# rehearses from the replicated buffer; every checkpoint kept, to compare the warm-up's.
DYNAMOS_FLAGS = [
    "--method=dynamos", "--class_order=1,7", "--epochs=2", "--train_examples_per_class=32", "--batch_size=16",
    "--eval_every=1", "--replay_buffer=16", "--dynamos_buffer_batch=8", "--dynamos_nf=4", "--dynamos_warmup=1",
    "--keep_checkpoints=10", "--log_every_steps=1",
]
# NISPA: a 32-unit MLP, phases of 2 epochs, at most 4 phases per task.
NISPA_FLAGS = [
    "--method=nispa", "--class_order=1,7", "--train_examples_per_class=32", "--batch_size=16", "--eval_every=1",
    "--nispa_hidden=32", "--nispa_phase_epochs=2", "--nispa_k=4", "--log_every_steps=1",
]
DIGEST = re.compile(r"final weights sha256 ([0-9a-f]{64})")
TIMEOUT_S = 600


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(args, log_path, tf_config=None, tmpdir=None):
    argv, env = cli_command(*args, onednn_env=os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    proc.log_file = log
    return proc


def _cluster(tmp_path, workdir, flags, tag, *extra):
    """Two workers of one cluster, started together; returns them (chief first)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    return [
        _start([*flags, "--distribution=multi_worker", f"--workdir={workdir}", *extra], tmp_path / f"{tag}{i}.log",
               {"cluster": cluster, "task": {"type": "worker", "index": i}}, tmpdir)
        for i in range(2)
    ]


def _wait(procs, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.log_file.close()
    return [p.log_path.read_text() for p in procs]


def _final_arrays(workdir):
    latest = CheckpointManager(workdir / "ckpt").newest()
    assert latest.state["phase"] == "task_end"
    return latest.arrays


@pytest.mark.parametrize("method", ["mas", pytest.param("dgmw", marks=pytest.mark.slow),
                                    pytest.param("nispa", marks=pytest.mark.slow)])
def test_two_workers_train_as_one_device(tmp_path, method):
    """A cluster of two single-replica workers: the chief's run is the one-device run
    (the mirrored tests' bars), both workers end on identical weights, the chief exports,
    and only the chief leaves files."""
    flags = {"mas": MAS_FLAGS, "dgmw": DGM_FLAGS, "nispa": NISPA_FLAGS}[method]
    procs = _cluster(tmp_path, tmp_path / "cluster", flags, "w")
    one = _start([*flags, f"--workdir={tmp_path / 'one'}"], tmp_path / "one.log")
    logs = _wait([*procs, one])
    for p, log in zip([*procs, one], logs):
        assert p.returncode == 0, log[-3000:]
    digests = [DIGEST.findall(log) for log in logs[:2]]
    assert all(len(d) == 1 for d in digests) and digests[0] == digests[1], digests  # the workers stayed in step
    assert not _worker_dirs(tmp_path)  # worker 1's directory is gone
    results = json.loads((tmp_path / "cluster" / "results.json").read_text())
    assert results["runtime"]["replicas"] == 2 and results["config"]["distribution"] == "multi_worker"
    assert results["tasks_completed"] == 2
    assert (tmp_path / "cluster" / "export" / "classifier" / "2" / "saved_model.pb").is_file()
    a, b = _final_arrays(tmp_path / "one"), _final_arrays(tmp_path / "cluster")
    assert sorted(a) == sorted(b)
    weights = [k for k in a if a[k].dtype.kind == "f" and a[k].size > 1]
    assert len(weights) >= 8  # NISPA: 4 kernels and 4 biases; MAS and DGM more
    diffs = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in weights])
    moved = float(np.mean(diffs > WEIGHT_ATOL))
    print(f"multi_worker vs one device: weights beyond {WEIGHT_ATOL}: {moved:.2e}, largest {diffs.max():.2e}")
    assert moved <= DGM_MOVED_FRACTION and diffs.max() < DGM_WEIGHT_MAX


@pytest.mark.slow
def test_dynamos_workers_keep_one_buffer_in_step(tmp_path):
    """Dynamos on a cluster of two workers: both end on the same weights and buffer (the
    digest covers every array of the final checkpoint state, the buffer included: each
    worker applies the same update from the gathered global batch), only the chief
    leaves files, and after the warm-up epoch the weights are one device's. (Later the
    runs part, as the mirrored test explains: sampled gates flip on last-bit
    differences.)"""
    procs = _cluster(tmp_path, tmp_path / "cluster", DYNAMOS_FLAGS, "w")
    one = _start([*DYNAMOS_FLAGS, f"--workdir={tmp_path / 'one'}"], tmp_path / "one.log")
    logs = _wait([*procs, one])
    for p, log in zip([*procs, one], logs):
        assert p.returncode == 0, log[-3000:]
    digests = [DIGEST.findall(log) for log in logs[:2]]
    assert all(len(d) == 1 for d in digests) and digests[0] == digests[1], digests
    assert not _worker_dirs(tmp_path)
    results = json.loads((tmp_path / "cluster" / "results.json").read_text())
    assert results["runtime"]["replicas"] == 2 and results["tasks_completed"] == 2
    assert results["method_state"][-1]["buffer_filled"] > 0
    first = {d: CheckpointManager(tmp_path / d / "ckpt").load(tmp_path / d / "ckpt" / "000001") for d in ("one", "cluster")}
    assert first["one"].state["epochs_done"] == 1 == first["cluster"].state["epochs_done"]
    worst = max(float(np.max(np.abs(first["one"].arrays[k] - first["cluster"].arrays[k])))
                for k in first["one"].arrays if k.startswith("dynamos/net/"))
    print(f"dynamos multi_worker vs one device after the warm-up epoch: {worst:.2e}")
    assert worst < WEIGHT_ATOL


def _worker_dirs(tmp_path):
    """Non-chief workers' directories in the workers' TMPDIR (a killed process also
    leaves TensorFlow's autograph files there, not ours)."""
    return sorted(p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("dgm_tf_worker_"))


def _checkpoints(workdir):
    ckpt = workdir / "ckpt"
    return sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []


@pytest.mark.slow
def test_a_killed_worker_stops_the_chief_with_one_line_and_both_resume(tmp_path):
    """Worker 1 is killed mid-run: the chief stops within the heartbeat timeout with one
    line, its checkpoints intact; both restarted with --resume finish the run, in step,
    on the weights of an uninterrupted one-device run."""
    flags = [*MAS_FLAGS, "--class_order=1,7,8", "--epochs=3"]
    workdir = tmp_path / "cluster"
    chief, worker = _cluster(tmp_path, workdir, flags, "first")
    deadline = time.monotonic() + TIMEOUT_S
    while len(_checkpoints(workdir)) < 2 and chief.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert chief.poll() is None, chief.log_path.read_text()[-3000:]
    worker.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    logs = _wait([chief, worker], timeout=180)
    stopped_after = time.monotonic() - killed_at
    assert chief.returncode == 3, logs[0][-3000:]
    errors = [line for line in logs[0].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "another worker of the cluster stopped" in errors[0], logs[0][-3000:]
    assert "--resume" in errors[0] and "Traceback" not in logs[0]
    print(f"chief stopped {stopped_after:.0f} s after worker 1 was killed")
    kept = CheckpointManager(workdir / "ckpt").newest()  # the chief's checkpoints load
    assert kept is not None and kept.state["task"] < 2
    left = _worker_dirs(tmp_path)  # the killed worker could not remove its directory
    assert len(left) == 1

    procs = _cluster(tmp_path, workdir, flags, "resumed", "--resume")
    one = _start([*flags, f"--workdir={tmp_path / 'one'}"], tmp_path / "one.log")
    logs = _wait([*procs, one])
    for p, log in zip([*procs, one], logs):
        assert p.returncode == 0, log[-3000:]
    assert all("resuming from" in log for log in logs[:2])
    digests = [DIGEST.findall(log) for log in logs[:2]]
    assert all(len(d) == 1 for d in digests) and digests[0] == digests[1], digests
    assert _worker_dirs(tmp_path) == left  # the resumed worker removed its own
    results = json.loads((workdir / "results.json").read_text())
    assert results["tasks_completed"] == 3
    a, b = _final_arrays(tmp_path / "one"), _final_arrays(workdir)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a if a[k].dtype.kind == "f")
    print(f"killed, resumed cluster vs one device: {worst:.2e}")
    assert worst < WEIGHT_ATOL, worst
