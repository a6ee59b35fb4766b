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

import numpy as np
import pytest

from dgm_tf import checkpoint, engine
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config
from dgm_tf.engine import timing

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
    held = {"write": 0, "steps": 0, "taken": None, "clock": None, "later": None, "released_by_training": None}
    released = threading.Event()
    original_begin, original_end = timing.StepTimer.on_train_batch_begin, timing.StepTimer.on_train_batch_end
    original_write = checkpoint._write_npz

    def weights(timer):
        return [w.numpy().copy() for w in timer.model.network.weights]

    def on_begin(self, batch, logs=None):
        if held["write"] == 1 and held["taken"] is None:
            # Before the first step after the checkpoint: what it was taken from.
            held["taken"] = weights(self)
            held["clock"] = {k: self.stopwatch.totals[k] for k in ("first_step", "iterations")}
        return original_begin(self, batch, logs)

    def on_end(self, batch, logs=None):
        original_end(self, batch, logs)
        if held["write"] == 1 and not released.is_set():
            held["steps"] += 1
            if held["steps"] == HELD_STEPS:
                held["later"] = weights(self)
                released.set()

    def write(path, arrays):
        held["write"] += 1
        if held["write"] == 1:
            # Synchronous writes would block training here: the wait would time out.
            held["released_by_training"] = released.wait(timeout=20)
        original_write(path, arrays)

    monkeypatch.setattr(timing.StepTimer, "on_train_batch_begin", on_begin)
    monkeypatch.setattr(timing.StepTimer, "on_train_batch_end", on_end)
    monkeypatch.setattr(checkpoint, "_write_npz", write)
    config = Config(**TINY)
    engine.run_experiment(config, tmp_path / "run")

    assert held["released_by_training"] is True, "training waited for the checkpoint's write"
    # Every checkpoint, in the order taken: each epoch's, then the task's end.
    epochs = config.epochs
    expected = [(t, "epoch", e) for t in range(2) for e in range(1, epochs + 1)]
    for t in range(2):
        expected.insert(expected.index((t, "epoch", epochs)) + 1, (t, "task_end", epochs))
    assert _order(tmp_path / "run") == expected
    # The held checkpoint holds the weights of the epoch it was taken at.
    manager = CheckpointManager(tmp_path / "run" / "ckpt")
    first = manager.load(manager.paths()[0])
    assert first.state["epochs_done"] == 1
    stored = [first.arrays[k] for k in sorted(first.arrays) if k.startswith("classifier/")]
    assert len(stored) == len(held["taken"])
    for a, b, later in zip(stored, held["taken"], held["later"]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(b, later) for b, later in zip(held["taken"], held["later"]))
    # And the task's clock as it was then (the steps trained during the write not in it).
    assert {k: first.state["task_time_s"][k] for k in held["clock"]} == held["clock"]
    assert held["clock"]["iterations"] > 0


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
