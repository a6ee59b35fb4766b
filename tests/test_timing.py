"""The engine's per-task time accounting (results.json ``time_breakdown_s``)."""

import time

import keras
import pytest

from dgm_tf.engine import StepTimer, Stopwatch, TimedCallback


def test_stopwatch_adds_up_phases_and_leaves_the_rest_to_other():
    clock = Stopwatch({"export": 1.0})  # a resumed task starts from its checkpoint's totals
    with clock.phase("export"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError):
        with clock.phase("validation"):  # time spent before an error still counts
            time.sleep(0.01)
            raise RuntimeError
    out = clock.breakdown(wall=5.0)
    assert 1.02 <= out["export"] < 1.2 and 0.01 <= out["validation"] < 0.2
    assert out["iterations"] == 0.0
    assert out["other"] == pytest.approx(5.0 - out["export"] - out["validation"], abs=1e-3)
    assert list(out) == list(Stopwatch.PHASES) + ["other"]


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.01)
        self.calls.append(("epoch_end", epoch))
        logs["val_acc"] = 0.5  # as ValidationSelection does for the ProgressLogger

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch))


def test_timed_callback_forwards_hooks_logs_and_model():
    clock = Stopwatch()
    inner = Recorder()
    timed = TimedCallback(inner, clock, "validation")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    timed.set_model(model)
    logs = {}
    timed.on_train_batch_end(3, {})
    timed.on_epoch_end(7, logs)
    assert inner.model is model
    assert inner.calls == [("batch_end", 3), ("epoch_end", 7)]
    assert logs == {"val_acc": 0.5}
    assert clock.totals["validation"] >= 0.01


def test_step_timer_counts_the_first_step_apart():
    clock = Stopwatch()
    timer = StepTimer(clock)
    # A long first step, so that a loaded machine's sleep overruns cannot blur the two.
    for batch, seconds in enumerate((0.2, 0.01, 0.01)):
        timer.on_train_batch_begin(batch)
        time.sleep(seconds)
        timer.on_train_batch_end(batch)
    assert clock.totals["first_step"] >= 0.2
    assert 0.02 <= clock.totals["iterations"] < 0.2
