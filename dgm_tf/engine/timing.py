"""Per-task time accounting, results.json ``time_breakdown_s``: ``Stopwatch`` (seconds
per named phase), ``StepTimer`` (the first training step apart from the rest) and
``TimedCallback`` (another callback, its hooks' time added to one phase). The clock is
this module's ``time.perf_counter`` (tests/test_timing.py replaces it).
"""

from __future__ import annotations

import contextlib
import time

import keras


class Stopwatch:
    """Seconds one task spends in each named phase: results.json ``time_breakdown_s``.

    ``first_step`` is the task's first training step (tracing and graph optimisation
    included), ``iterations`` every other step; ``validation``, ``monitoring`` and
    ``checkpoint`` the callbacks of those names (epoch and task end); the rest is what
    ``_run_task`` names. ``breakdown(wall)`` adds ``other``: the wall time no phase
    claims (Keras's per-epoch ``fit`` set-up, the epoch's dataset, logging).
    """

    PHASES = (
        "begin_task", "first_step", "iterations", "validation", "monitoring", "checkpoint",
        "evaluation", "end_task", "samples", "export",
    )

    def __init__(self, totals: dict[str, float] | None = None):
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.totals.update(totals or {})

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start

    def breakdown(self, wall: float) -> dict[str, float]:
        out = {name: round(seconds, 3) for name, seconds in self.totals.items()}
        out["other"] = round(wall - sum(self.totals.values()), 3)
        return out


class StepTimer(keras.callbacks.Callback):
    """Adds each training step's time to ``stopwatch``: the first one this process
    runs for the task as ``first_step`` (a resumed task traces again), the rest as
    ``iterations``. The window between its batch hooks holds the whole step: eager
    TensorFlow runs the step's function synchronously, and a callback with a batch-end
    hook makes Keras call the hooks in line rather than on its async callback thread."""

    def __init__(self, stopwatch: Stopwatch):
        super().__init__()
        self.stopwatch = stopwatch
        self.first = True
        self.start = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.stopwatch.totals["first_step" if self.first else "iterations"] += time.perf_counter() - self.start
        self.first = False


class TimedCallback(keras.callbacks.Callback):
    """``callback`` itself, its hooks' time added to ``phase`` of ``stopwatch``."""

    def __init__(self, callback: keras.callbacks.Callback, stopwatch: Stopwatch, phase: str):
        super().__init__()
        self.callback, self.stopwatch, self.phase = callback, stopwatch, phase

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)


def _timed_hook(name):
    def hook(self, *args, **kwargs):
        with self.stopwatch.phase(self.phase):
            return getattr(self.callback, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _hook in (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end",
):
    setattr(TimedCallback, _hook, _timed_hook(_hook))
