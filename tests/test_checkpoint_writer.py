"""Checkpoints written while training goes on (dgm_tf/engine/loop.py ``save``, issue 23).

The engine takes each checkpoint's snapshot in the training thread at the epoch's (or
task's) end and writes it on a thread of its own. What must hold: training does not
wait for the write; the checkpoint holds the weights of the moment it was taken, not
those of the steps trained while it was written; checkpoints appear in the order they
were taken; a write that fails stops the run with that error, the earlier checkpoints
intact; a non-finite snapshot is still refused before anything is written.
"""

import errno
import threading
import time

import numpy as np
import pytest

from dgm_tf import checkpoint, engine
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config
from dgm_tf.engine import callbacks, timing

# Two one-class tasks (trouser, sneaker) of 32 images, batches of 16: 2 steps per epoch.
TINY = dict(
    method="finetune", dataset="embedded", class_order=(1, 7), classes_per_task=1, epochs=3,
    train_examples_per_class=32, batch_size=16, ndf=4, eval_every=1, samples_per_class=2, lr_d=0.01,
    export=False, keep_checkpoints=100,
)
HELD_STEPS = 2  # steps trained while the first checkpoint's write is held: all of the next epoch's


def _order(workdir):
    manager = CheckpointManager(workdir / "ckpt")
    return [(c.state["task"], c.state["phase"], c.state["epochs_done"])
            for c in (manager.load(p) for p in manager.paths())]


def test_training_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    held = {"timer": None, "submitted": False, "steps": 0, "taken": None, "clock": None, "later": None,
            "writes": 0, "released_by_training": None}
    released = threading.Event()
    original_save = callbacks.EpochCheckpoint.on_epoch_end
    original_end = timing.StepTimer.on_train_batch_end
    original_write = checkpoint._write_npz

    def on_epoch_end(self, epoch, logs=None):
        original_save(self, epoch, logs)
        if not held["submitted"]:
            # In the training thread, right after the first checkpoint was taken: what
            # it was taken from (nothing trains between the two).
            held["submitted"] = True
            held["taken"] = [w.numpy().copy() for w in self.model.network.weights]
            held["clock"] = {k: held["timer"].stopwatch.totals[k] for k in ("first_step", "iterations")}

    def on_end(self, batch, logs=None):
        original_end(self, batch, logs)
        held["timer"] = self  # the task's StepTimer, whose stopwatch the checkpoint records
        if held["submitted"] and not released.is_set():
            held["steps"] += 1
            if held["steps"] == HELD_STEPS:
                held["later"] = [w.numpy().copy() for w in self.model.network.weights]
                released.set()

    def write(path, arrays):
        held["writes"] += 1
        if held["writes"] == 1:
            # A synchronous write would block training here: the wait would time out.
            held["released_by_training"] = released.wait(timeout=20)
        original_write(path, arrays)

    monkeypatch.setattr(callbacks.EpochCheckpoint, "on_epoch_end", on_epoch_end)
    monkeypatch.setattr(timing.StepTimer, "on_train_batch_end", on_end)
    monkeypatch.setattr(checkpoint, "_write_npz", write)
    config = Config(**TINY)
    engine.run_experiment(config, tmp_path / "run")

    assert held["released_by_training"] is True, "training waited for the checkpoint's write"
    assert _order(tmp_path / "run") == _all_checkpoints(config)
    # The held checkpoint holds the weights of the epoch it was taken at.
    manager = CheckpointManager(tmp_path / "run" / "ckpt")
    first = manager.load(manager.paths()[0])
    assert first.state["epochs_done"] == 1
    stored = [first.arrays[k] for k in sorted(first.arrays) if k.startswith("classifier/")]
    assert len(stored) == len(held["taken"])
    for a, b in zip(stored, held["taken"]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(b, later) for b, later in zip(held["taken"], held["later"]))
    # And the task's clock as it was then (the steps trained during the write not in it).
    assert {k: first.state["task_time_s"][k] for k in held["clock"]} == held["clock"]
    assert held["clock"]["iterations"] > 0


def _all_checkpoints(config):
    """Every checkpoint of a two-task run, in the order taken: each epoch's, then the
    task's end."""
    out = []
    for t in range(2):
        out += [(t, "epoch", e) for e in range(1, config.epochs + 1)] + [(t, "task_end", config.epochs)]
    return out


def _slow_writes(monkeypatch, seconds, which=lambda n: True):
    original_write = checkpoint._write_npz
    calls = {"n": 0}

    def write(path, arrays):
        calls["n"] += 1
        if which(calls["n"]):
            time.sleep(seconds)
        original_write(path, arrays)

    monkeypatch.setattr(checkpoint, "_write_npz", write)


def test_the_last_checkpoint_is_on_disk_when_the_run_returns(tmp_path, monkeypatch):
    config = Config(**TINY)
    last = len(_all_checkpoints(config))
    _slow_writes(monkeypatch, 1.0, which=lambda n: n == last)
    engine.run_experiment(config, tmp_path / "run")
    assert _order(tmp_path / "run") == _all_checkpoints(config)


def test_a_run_stopped_by_an_error_finishes_the_pending_write_first(tmp_path, monkeypatch):
    _slow_writes(monkeypatch, 1.0, which=lambda n: n == 1)
    original_begin = timing.StepTimer.on_train_batch_begin
    steps = {"n": 0}

    def on_begin(self, batch, logs=None):
        steps["n"] += 1
        if steps["n"] == 3:  # the first step after the first checkpoint (2 steps per epoch)
            raise RuntimeError("stopped on purpose")
        return original_begin(self, batch, logs)

    monkeypatch.setattr(timing.StepTimer, "on_train_batch_begin", on_begin)
    with pytest.raises(RuntimeError, match="on purpose"):
        engine.run_experiment(Config(**TINY), tmp_path / "run")
    assert _order(tmp_path / "run") == [(0, "epoch", 1)]


def test_a_failed_background_write_stops_the_run_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    original_write = checkpoint._write_npz
    calls = {"n": 0}

    def write(path, arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original_write(path, arrays)

    monkeypatch.setattr(checkpoint, "_write_npz", write)
    with pytest.raises(OSError) as failure:
        engine.run_experiment(Config(**TINY), tmp_path / "run")
    assert failure.value.errno == errno.ENOSPC
    assert _order(tmp_path / "run") == [(0, "epoch", 1)]  # the first is whole and loadable
    leftovers = [p.name for p in (tmp_path / "run" / "ckpt").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the failed write's temporary was removed


def test_a_non_finite_snapshot_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from dgm_tf.methods import classifier_base

    original_state = classifier_base.ClassifierBaseline.checkpoint_state
    calls = {"n": 0}

    def poisoned_state(self, during_task=True):
        state, arrays, shared = original_state(self, during_task)
        calls["n"] += 1
        if calls["n"] == 2:
            key = next(k for k in sorted(arrays) if k.startswith("classifier/"))
            arrays[key] = np.full_like(arrays[key], np.nan)
        return state, arrays, shared

    monkeypatch.setattr(classifier_base.ClassifierBaseline, "checkpoint_state", poisoned_state)
    with pytest.raises(engine.TrainingError, match="non-finite checkpoint arrays"):
        engine.run_experiment(Config(**TINY), tmp_path / "run")
    assert _order(tmp_path / "run") == [(0, "epoch", 1)]
    assert calls["n"] == 2  # refused when taken: training did not go on to another epoch
