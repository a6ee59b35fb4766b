"""The task loop shared by every method: begin task, fit, put back the best validation
epoch's classifier (``--restore_best``), evaluate, end task, write.

``run_experiment(config, workdir)`` is the library's entry point; ``dgm_tf.main`` only
turns flags into a ``Config`` and calls it. Everything a run writes goes under
``workdir`` (layout in WORKSPACE.md).

The files, each importing only those above it:

- ``distribute.py``: the one place that knows the ``--distribution`` strategy
  (``make_strategy``, ``is_chief``, ``replicas_in_sync``); the methods write
  their losses as per-replica shares (``dgm_tf.replica``) and never ask.
- ``timing.py``: time accounting, results.json ``time_breakdown_s`` (``Stopwatch``,
  ``StepTimer``, ``TimedCallback``).
- ``evaluation.py``: what a task's end measures and reports (``evaluate``,
  ``replay_accuracy``, ``seen_labels``, ``write_sample_grid``, results.json rows,
  ``format_summary``; ``EVAL_BATCH``, ``REPLAY_EVAL_PER_CLASS``).
- ``callbacks.py``: the per-epoch services handed to ``method.train_task``
  (``ValidationSelection``, ``ProgressLogger``, ``NonFiniteGuard``, ``EpochCheckpoint``)
  and ``TrainingError``.
- ``resume.py``: ``check_resume`` (the flags of the run) and ``resume_checkpoint`` (the
  newest usable checkpoint, the data fingerprint), rows of older checkpoints.
- ``loop.py``: ``build_scenario``, ``run_experiment`` (workdir lock, flags.txt) and the
  per-task loop (``_run_task``), ``check_finite_for_export``.

The names below are the engine's interface (``from dgm_tf import engine``). A test that
replaces a function must patch the module that looks it up, e.g.
``dgm_tf.engine.callbacks.evaluate`` for the validation selection, not this package.
"""

from dgm_tf.engine.callbacks import (
    EpochCheckpoint,
    NonFiniteGuard,
    ProgressLogger,
    TrainingError,
    ValidationSelection,
)
from dgm_tf.engine.evaluation import (
    EVAL_BATCH,
    REPLAY_EVAL_PER_CLASS,
    evaluate,
    format_summary,
    replay_accuracy,
    seen_labels,
    write_sample_grid,
)
from dgm_tf.engine.loop import build_scenario, check_finite_for_export, run_experiment
from dgm_tf.engine.resume import (
    ADDED_AFTER_RUNS,
    RESUME_MAY_CHANGE,
    check_resume,
    resume_checkpoint,
)
from dgm_tf.engine.timing import StepTimer, Stopwatch, TimedCallback
from dgm_tf.workdir import WorkdirError  # what run_experiment raises for a workdir it refuses

__all__ = [
    "ADDED_AFTER_RUNS",
    "EVAL_BATCH",
    "REPLAY_EVAL_PER_CLASS",
    "RESUME_MAY_CHANGE",
    "EpochCheckpoint",
    "NonFiniteGuard",
    "ProgressLogger",
    "StepTimer",
    "Stopwatch",
    "TimedCallback",
    "TrainingError",
    "ValidationSelection",
    "WorkdirError",
    "build_scenario",
    "check_finite_for_export",
    "check_resume",
    "evaluate",
    "format_summary",
    "replay_accuracy",
    "resume_checkpoint",
    "run_experiment",
    "seen_labels",
    "write_sample_grid",
]
