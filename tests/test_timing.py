"""The engine's per-task time accounting (results.json ``time_breakdown_s``).

The timers read ``time.perf_counter`` through ``dgm_tf.engine.timing``; these tests hand them
a clock that moves only when the test says so, so every figure is exact and no load on
the machine (a slow sleep, a descheduled process) can move it.
"""

import types

import keras
import pytest

from dgm_tf.engine import StepTimer, Stopwatch, TimedCallback, timing


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_stopwatch_adds_up_phases_and_leaves_the_rest_to_other(clock):
    watch = Stopwatch({"export": 1.0})  # a resumed task starts from its checkpoint's totals
    clock.advance(7.0)  # time outside any phase belongs to no phase
    with watch.phase("export"):
        clock.advance(0.25)
    with pytest.raises(RuntimeError):
        with watch.phase("validation"):  # time spent before an error still counts
            clock.advance(0.5)
            raise RuntimeError
    with watch.phase("export"):  # a phase entered twice adds up
        clock.advance(0.125)
    out = watch.breakdown(wall=5.0)
    assert out["export"] == pytest.approx(1.375, abs=1e-12)
    assert out["validation"] == pytest.approx(0.5, abs=1e-12)
    assert out["iterations"] == 0.0
    assert out["other"] == pytest.approx(5.0 - 1.375 - 0.5, abs=1e-12)
    assert list(out) == list(Stopwatch.PHASES) + ["other"]
    # Rounded to milliseconds (results.json figures).
    with watch.phase("samples"):
        clock.advance(0.0123456)
    assert watch.breakdown(wall=5.0)["samples"] == 0.012


class Recorder(keras.callbacks.Callback):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.calls = []

    def on_epoch_end(self, epoch, logs=None):
        self.clock.advance(0.75)
        self.calls.append(("epoch_end", epoch))
        logs["val_acc"] = 0.5  # as ValidationSelection does for the ProgressLogger

    def on_train_batch_end(self, batch, logs=None):
        self.clock.advance(0.125)
        self.calls.append(("batch_end", batch))


def test_timed_callback_forwards_hooks_logs_and_model(clock):
    watch = Stopwatch()
    inner = Recorder(clock)
    timed = TimedCallback(inner, watch, "validation")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    timed.set_model(model)
    logs = {}
    timed.on_train_batch_end(3, {})
    clock.advance(2.0)  # between hooks: not the callback's time
    timed.on_epoch_end(7, logs)
    assert inner.model is model
    assert inner.calls == [("batch_end", 3), ("epoch_end", 7)]
    assert logs == {"val_acc": 0.5}
    assert watch.totals["validation"] == pytest.approx(0.875, abs=1e-12)
    assert sum(watch.totals.values()) == pytest.approx(0.875, abs=1e-12)


def test_step_timer_counts_the_first_step_apart(clock):
    watch = Stopwatch()
    timer = StepTimer(watch)
    for batch, seconds in enumerate((4.0, 0.25, 0.5)):
        timer.on_train_batch_begin(batch)
        clock.advance(seconds)
        timer.on_train_batch_end(batch)
        clock.advance(1.0)  # between steps (data, other callbacks): not a step
    assert watch.totals["first_step"] == pytest.approx(4.0, abs=1e-12)
    assert watch.totals["iterations"] == pytest.approx(0.75, abs=1e-12)
    assert sum(watch.totals.values()) == pytest.approx(4.75, abs=1e-12)
