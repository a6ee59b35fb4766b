"""The task loop shared by every method: begin task, fit, put back the best validation
epoch's classifier (``--restore_best``), evaluate, end task, write.

``run_experiment(config, workdir)`` is the library's entry point; ``dgm_tf.main`` only
turns flags into a ``Config`` and calls it. Everything a run writes goes under
``workdir`` (layout in WORKSPACE.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import time
from typing import Sequence

import keras
import numpy as np
from absl import logging

from dgm_tf import export, io_utils, metrics, monitoring, runtime
from dgm_tf.checkpoint import RESTORE_ERRORS, Checkpoint, CheckpointError, CheckpointManager
from dgm_tf.config import Config, ConfigError
from dgm_tf.data import (
    Scenario, TaskData, fingerprint_differences, load_dataset, make_scenario, resolve_class_order,
    scenario_fingerprint,
)
from dgm_tf.methods import make_method
from dgm_tf.methods.base import ContinualMethod
from dgm_tf.workdir import WorkdirError, check_fresh, lock_workdir  # noqa: F401 (engine.WorkdirError)

EVAL_BATCH = 500
REPLAY_EVAL_PER_CLASS = 100


def build_scenario(config: Config) -> Scenario:
    """Load the dataset and cut it into tasks as the config says."""
    used = config.num_tasks * config.classes_per_task if config.num_tasks else None
    resolved = []

    def select(class_ids):
        # Sources that read selectively (tfds) resolve the order over all the dataset's
        # class ids and read only the classes the tasks use.
        order = resolve_class_order(config.class_order, class_ids)
        order = list(class_ids) if order is None else [int(c) for c in order]
        order = order[:used] if used else order
        resolved.append(order)
        return order

    raw = load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        download=config.download,
        channels=config.channels,
        test_fraction=config.test_fraction,
        seed=config.seed,
        select=select,
    )
    scenario = make_scenario(
        raw,
        class_order=resolved[-1] if resolved else config.class_order,
        classes_per_task=config.classes_per_task,
        num_tasks=config.num_tasks or None,
        train_examples_per_class=config.train_examples_per_class,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
    )
    if config.nz <= scenario.num_classes:
        raise ConfigError(
            f"--nz: must exceed the number of classes ({scenario.num_classes}), whose one-hot "
            f"code overwrites the first entries of the noise; got {config.nz}"
        )
    return scenario


def evaluate(method: ContinualMethod, tasks: Sequence[TaskData], split: str) -> tuple[list[float], list[float]]:
    """Class-incremental and task-aware accuracy on each task's ``split`` ("val"/"test")."""
    class_il, task_aware = [], []
    for task in tasks:
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        logits = np.concatenate(
            [method.classifier_logits(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
        )
        class_il.append(metrics.accuracy_from_predictions(np.argmax(logits, axis=1), y))
        task_aware.append(
            metrics.accuracy_from_predictions(metrics.task_aware_predictions(logits, task.labels), y)
        )
    return class_il, task_aware


class ValidationSelection(keras.callbacks.Callback):
    """Every ``every`` epochs (and after the last), evaluate validation accuracy on all
    seen tasks and keep a copy of the classifier (``method.classifier_weights()``:
    weights and BN statistics) of the epoch with the best mean validation accuracy.

    Candidates: epochs 0, every, 2·every, ... (0-based, the reference's
    ``epoch % 2 == 0``) and the last epoch, which is always evaluated (the reference
    validates once more after its loop); with ``every`` >= epochs that is the first and
    the last epoch. Ties: an epoch replaces the best only when its mean is strictly
    higher, so of equal means the earliest epoch wins, as in the reference
    (approaches/DGMw.py ``valid``: ``if self.best_valid_acc < acc_av``).

    At the end of the task ``restore_best`` puts the kept classifier back (the engine's
    ``--restore_best``, what Keras's ``EarlyStopping(restore_best_weights=True)`` does);
    ``finish`` gives the best epoch's test row without keeping it (``--norestore_best``,
    the reference's harness: it reports that row and keeps the last weights). The
    reference evaluates the test split at every such epoch; here test is evaluated once,
    at the end: the same row, without a test pass per improvement (up to 10,000 images
    each at task 10 of split MNIST; README, Performance).
    """

    _ARRAY_PREFIX = "selection/best/"

    def __init__(self, method: ContinualMethod, tasks: Sequence[TaskData], every: int, epochs: int):
        super().__init__()
        self.method, self.tasks, self.every, self.epochs = method, tasks, every, epochs
        self.best_val = -1.0
        self.best_epoch: int | None = None
        self.best_weights: list[np.ndarray] | None = None
        self.best_test: list[float] | None = None  # set by ``finish``

    def state(self) -> dict:
        return {"best_val": self.best_val, "best_epoch": self.best_epoch}

    def arrays(self) -> dict[str, np.ndarray]:
        """The best epoch's classifier weights, for the checkpoint."""
        return {f"{self._ARRAY_PREFIX}{i:04d}": w for i, w in enumerate(self.best_weights or [])}

    def restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        keys = sorted(k for k in arrays if k.startswith(self._ARRAY_PREFIX))
        self.best_weights = [arrays[k] for k in keys] or None
        # Checkpoints written before the weights were kept hold the test row itself.
        self.best_test = state.get("best_test")
        if self.best_epoch is not None and self.best_weights is None and self.best_test is None:
            raise ValueError("checkpoint: the best validation epoch's classifier weights are missing")

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every and epoch != self.epochs - 1:
            return
        val, _ = evaluate(self.method, self.tasks, "val")
        # Strictly better only: the earliest of equal epochs stays (class docstring).
        if float(np.mean(val)) > self.best_val:
            self.best_val = float(np.mean(val))
            self.best_epoch = epoch
            self.best_weights = self.method.classifier_weights()  # copies
            self.best_test = None
        if logs is not None:
            logs["val_acc"] = float(np.mean(val))

    def restore_best(self) -> int:
        """Put the best epoch's classifier back; returns the epoch (0-based) whose
        classifier is now in place. The last epoch when the best weights were not kept
        (a checkpoint of an older version kept only the test row: logged)."""
        if self.best_weights is None:
            if self.best_epoch is not None:
                logging.warning(
                    "the checkpoint this task resumed from predates keeping the best validation epoch's "
                    "weights: the task keeps its last epoch's classifier"
                )
            return self.epochs - 1
        self.method.set_classifier_weights(self.best_weights)
        return self.best_epoch

    def finish(self, final_test: list[float]) -> list[float] | None:
        """The best epoch's test row, the weights in place left as they are;
        ``final_test`` is the row of those weights, reused when the best epoch is the
        last one (the same weights)."""
        if self.best_epoch is None or self.best_weights is None:
            return self.best_test
        if self.best_epoch == self.epochs - 1:
            self.best_test = list(final_test)
            return self.best_test
        current = self.method.classifier_weights()
        self.method.set_classifier_weights(self.best_weights)
        try:
            self.best_test, _ = evaluate(self.method, self.tasks, "test")
        finally:
            self.method.set_classifier_weights(current)
        return self.best_test


class ProgressLogger(keras.callbacks.Callback):
    """One console line per epoch: losses, epoch time and the task's ETA."""

    KEYS = ("d_loss", "g_loss", "wasserstein", "gradient_penalty", "mask_reg", "c_loss", "c_acc", "mas_penalty", "val_acc", "s")

    def __init__(self, task: int, num_tasks: int, epochs: int, first_epoch: int = 0):
        super().__init__()
        self.task, self.num_tasks, self.epochs, self.first_epoch = task, num_tasks, epochs, first_epoch
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (epoch + 1 - self.first_epoch) * (self.epochs - epoch - 1)
        values = " ".join(f"{k}={logs[k]:.4g}" for k in self.KEYS if k in logs)
        logging.info(
            "task %d/%d epoch %d/%d %s (%.1fs, task ETA %.0fs)",
            self.task + 1, self.num_tasks, epoch + 1, self.epochs, values, elapsed, eta,
        )


def _matrix(rows: Sequence[Sequence[float]], num_tasks: int) -> list[list[float | None]]:
    return [list(r) + [None] * (num_tasks - len(r)) for r in rows]


def seen_labels(scenario: Scenario, task: int) -> list[int]:
    """Model labels of every class in tasks 0..task, in class order."""
    return [label for t in scenario.tasks[: task + 1] for label in t.labels]


def replay_accuracy(method: ContinualMethod, scenario: Scenario, task: int, per_class: int, seed: int):
    """Per seen class, the current classifier's accuracy on generated images of that
    class (None for non-generative methods): how recognisable the generative memory is."""
    seen = seen_labels(scenario, task)
    labels = np.repeat(np.array(seen, np.int32), per_class)
    images = method.sample(labels, seed=seed)
    if images is None:
        return None
    logits = np.concatenate(
        [method.classifier_logits(images[i : i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)]
    )
    hits = np.argmax(logits, axis=1) == labels
    return [float(hits[labels == c].mean()) for c in seen]


def write_sample_grid(method: ContinualMethod, scenario: Scenario, task: int, workdir: pathlib.Path, config: Config):
    """samples/task_XX.png: one row per seen class, ``samples_per_class`` columns.
    Returns the grid (uint8) or None for methods without a generator."""
    grid = monitoring.sample_grid(
        method, scenario, task, config.samples_per_class, seed=config.seed + 7919 * (task + 1)
    )
    if grid is not None:
        io_utils.save_png(workdir / "samples" / f"task_{task + 1:02d}.png", grid)
    return grid


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says where."""


# Config fields a resumed run may change: they do not change what is computed.
RESUME_MAY_CHANGE = frozenset({"log_every_steps", "keep_checkpoints"})
# Fields added after runs were written. A flags.txt that does not name one is of a run
# that predates it: it reads as the default, and the run may be resumed with either
# value (its finished tasks ran as the code then did; results.json says how).
ADDED_AFTER_RUNS = frozenset({"restore_best"})


def _named_flags(text: str) -> set[str]:
    return {line.strip().partition("=")[0].lstrip("-") for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")}


def check_resume(workdir: pathlib.Path, config: Config) -> None:
    """Refuse to resume into a workdir of another experiment, listing the differences."""
    flags_path = workdir / "flags.txt"
    if not workdir.is_dir():
        raise WorkdirError(f"--workdir={workdir}: does not exist; nothing to resume (drop --resume to start)")
    if not flags_path.is_file():
        raise WorkdirError(f"--workdir={workdir}: has no flags.txt, so it holds no run to resume")
    try:
        text = flags_path.read_text()
        stored = Config.from_flags_text(text)
    except (OSError, ConfigError) as e:
        raise WorkdirError(f"{flags_path}: cannot read the run's flags ({e})") from None
    old, new = stored.as_dict(), config.as_dict()
    free = RESUME_MAY_CHANGE | (ADDED_AFTER_RUNS - _named_flags(text))
    changed = [k for k in old if old[k] != new[k] and k not in free]
    if changed:
        diffs = "; ".join(f"--{k}: run has {old[k]!r}, now {new[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume: the flags change the experiment in {workdir} ({diffs}); resume with the run's own "
            f"flags (--flagfile={flags_path}) or start a new --workdir"
        )


def resume_checkpoint(
    checkpoints: CheckpointManager, method: ContinualMethod, scenario: Scenario, config: Config, path: pathlib.Path
) -> Checkpoint | None:
    """Restore ``method`` from the newest usable checkpoint and return it (``restored``:
    the task's ``ValidationSelection`` for a mid-task checkpoint, else None), or None
    when ``ckpt/`` holds no checkpoint and no task was completed (the run starts over).

    A checkpoint that does not load or does not restore (a missing key, a changed
    shape) is skipped with a warning naming it and why, for the previous one. Nothing
    is written here, so a refusal leaves the workdir as it was.

    Raises:
        CheckpointError: checkpoints exist but none can be used (each named, with why),
            or none exists although results.json records completed tasks.
        ConfigError: the run's data differ from the data now (what changed is named).
    """
    fingerprint = scenario_fingerprint(scenario)

    def restore(checkpoint: Checkpoint):
        st = checkpoint.state
        recorded = st.get("data")
        if recorded is None:
            logging.warning("%s records no data fingerprint (an older version wrote it): data not compared",
                            checkpoint.path)
        else:
            changed = fingerprint_differences(recorded, fingerprint)
            if changed:
                raise ConfigError(
                    f"--resume: the data of the run in {path} changed ({'; '.join(changed)}); resume it with "
                    "the data it started with, or start a new --workdir"
                )
        st["engine"], st["monitor"], st["task_elapsed_s"]  # noqa: B018 (KeyError: skip this checkpoint)
        if st["phase"] == "task_end":
            method.restore_checkpoint(st["method"], checkpoint.arrays, checkpoint.shared, task=None)
            return None
        task = scenario.tasks[st["task"]]
        method.restore_checkpoint(st["method"], checkpoint.arrays, checkpoint.shared, task=task)
        selection = ValidationSelection(method, scenario.tasks[: task.index + 1], config.eval_every, config.epochs)
        selection.restore(st["selection"], checkpoint.arrays)
        return selection

    import tensorflow as tf

    found = checkpoints.restore_newest(restore, errors=RESTORE_ERRORS + (tf.errors.OpError,))
    if found is None and (path / "results.json").exists():
        raise CheckpointError(
            checkpoints.directory,
            "holds no checkpoint but results.json records completed tasks, so a resume would start the run "
            "over and overwrite them; nothing was changed; restore ckpt/ from a backup or start a new --workdir",
        )
    return found


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss, naming task, epoch and step."""

    def __init__(self, task: int):
        super().__init__()
        self.task = task
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for key, value in (logs or {}).items():
            if key.endswith("_step") and not np.all(np.isfinite(np.asarray(value))):
                raise TrainingError(
                    f"non-finite {key[:-5]} ({float(np.asarray(value))}) in task {self.task + 1}, "
                    f"epoch {self.epoch + 1}, step {batch + 1}; the checkpoints of earlier epochs are kept "
                    "(lower the learning rates in a new run)"
                )


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves a checkpoint after every epoch (``save_fn(epochs_done)``)."""

    def __init__(self, save_fn):
        super().__init__()
        self.save_fn = save_fn

    def on_epoch_end(self, epoch, logs=None):
        self.save_fn(epoch + 1)


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


def run_experiment(config: Config, workdir: str | os.PathLike, resume: bool = False) -> dict:
    """Run every task of the scenario and return (and write) the results.

    With ``resume``, continue the run in ``workdir`` from its newest checkpoint (the
    flags and the data must be those of the run); the results and final weights equal
    an uninterrupted run's. The workdir is locked for the whole run
    (``dgm_tf.workdir``): a second process is refused at once.

    Raises ConfigError, DataError or WorkdirError for user errors, before anything is
    written when possible (CheckpointError when no checkpoint can be resumed from);
    TrainingError when training cannot go on.
    """
    path = pathlib.Path(workdir)
    with contextlib.ExitStack() as stack:
        if resume:
            check_resume(path, config)  # a mismatch is reported before any data is read
            stack.enter_context(lock_workdir(path))  # a second process is refused at once
        else:
            check_fresh(path)  # a non-empty directory is refused before any data is read
        scenario = build_scenario(config)  # user errors in data/flags surface before any write
        if not resume:
            stack.enter_context(lock_workdir(path, fresh=True))  # creates it; rechecks emptiness
            io_utils.atomic_write_text(
                path / "flags.txt",
                "# Reproduces this run: python -m dgm_tf.main --flagfile=flags.txt --workdir=<new dir>\n"
                + "\n".join(config.to_flags())
                + "\n",
            )
        return _run_experiment(config, scenario, path, resume)


def _run_experiment(config: Config, scenario: Scenario, path: pathlib.Path, resume: bool) -> dict:
    """``run_experiment`` once the workdir is locked and the scenario built."""
    if config.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # process-wide, as the user asked
    checkpoints = CheckpointManager(path / "ckpt", keep=config.keep_checkpoints)
    keras.utils.set_random_seed(config.seed)
    method = make_method(config, scenario)
    # Restored before anything is written (the Monitor creates its event file at
    # once), so a refused resume leaves the workdir as it was.
    latest = resume_checkpoint(checkpoints, method, scenario, config, path) if resume else None
    fingerprint = scenario_fingerprint(scenario)
    monitor = monitoring.Monitor(path / "tb", config, scenario)
    rows = {
        "acc": [], "aware": [], "best": [], "replay": [], "summaries": [], "wall": [], "time": [],
        "last_acc": [], "last_aware": [], "best_epoch": [], "selected_epoch": [],
    }
    first_task, resume_mid_task = 0, False
    if latest is None:
        if resume:
            logging.warning("no checkpoint in %s: starting the run from its first task", path / "ckpt")
        monitor.start()
    else:
        st = latest.state
        rows = st["engine"]
        rows.setdefault("time", [None] * len(rows["wall"]))  # checkpoints from before the breakdown
        if "selected_epoch" not in rows:
            _rows_before_restore_best(rows, config, path)
        monitor.restore(st["monitor"])
        if st["phase"] == "task_end":
            first_task = st["task"] + 1
        else:
            first_task, resume_mid_task = st["task"], True
        logging.info("resuming from %s: task %d, %s", latest.path, st["task"] + 1,
                     "finished" if st["phase"] == "task_end" else f"{st['epochs_done']} epochs done")
    logging.info(
        "%s on %s: %d tasks of %d classes, order %s, %d train images per task",
        config.method, scenario.dataset, scenario.num_tasks, scenario.classes_per_task,
        list(scenario.class_order), len(scenario.tasks[0].x_train),
    )

    def save(phase, task_index, epochs_done, selection, elapsed, stopwatch=None):
        method_state, arrays, shared = method.checkpoint_state(during_task=phase == "epoch")
        if selection is not None:
            arrays.update(selection.arrays())
        # Refuses non-finite arrays (io_utils.NonFiniteError) before writing or pruning.
        checkpoints.save(
            {
                "phase": phase, "task": task_index, "epochs_done": epochs_done,
                "engine": rows, "method": method_state, "monitor": monitor.state(),
                "selection": None if selection is None else selection.state(),
                "task_elapsed_s": elapsed, "task_time_s": None if stopwatch is None else stopwatch.totals,
                "config": config.as_dict(), "data": fingerprint,
            },
            arrays, shared,
        )

    results = _results(config, scenario, rows) if rows["acc"] else {}
    try:
        for task in scenario.tasks[first_task:]:
            resume_from = latest if resume_mid_task and task.index == first_task else None
            try:
                results = _run_task(config, scenario, path, method, monitor, task, rows, save, resume_from)
            except io_utils.NonFiniteError as e:  # weights or generated images: as a non-finite loss
                raise TrainingError(
                    f"{e} in task {task.index + 1}; nothing was saved from it, the checkpoints of earlier "
                    "epochs are kept (lower the learning rates in a new run)"
                ) from None
    except BaseException:
        # Flush what was written, also when training stops on an error; a failure to
        # close (the disk that just filled up) must not hide the error that stopped it.
        try:
            monitor.close()
        except Exception as close_error:  # noqa: BLE001 (reported, the original error goes on)
            logging.warning("TensorBoard events could not be flushed: %s", close_error)
        raise
    monitor.close()
    logging.info("summary:\n%s", format_summary(results))
    return results


def _rows_before_restore_best(rows: dict, config: Config, path: pathlib.Path) -> None:
    """Fill in the rows a checkpoint written before ``--restore_best`` lacks: its
    finished tasks kept, evaluated and exported their last epoch's classifier."""
    done = len(rows["acc"])
    rows["last_acc"] = [list(r) for r in rows["acc"]]
    rows["last_aware"] = [list(r) for r in rows["aware"]]
    rows["best_epoch"] = [None] * done
    rows["selected_epoch"] = [config.epochs] * done
    if done:
        logging.warning(
            "%s predates --restore_best: its %d finished task(s) kept their last epoch's classifier "
            "(results.json selected_epoch); the remaining tasks %s", path, done,
            "restore the best validation epoch's" if config.restore_best else "keep the last epoch's",
        )


def _run_task(config, scenario, path, method, monitor, task, rows, save, resume_from) -> dict:
    """One task: begin it (or restore it mid-task from the checkpoint ``resume_from``),
    train, evaluate the last epoch's classifier, put back the best validation epoch's
    (``--restore_best``) and evaluate it, end the task, write its outputs and
    checkpoint; returns the results."""
    T = scenario.num_tasks
    t = task.index
    start = time.perf_counter()
    if resume_from is not None:  # the method and the selection were restored by resume_checkpoint
        st = resume_from.state
        clock = Stopwatch(st.get("task_time_s"))
        selection = resume_from.restored
        initial_epoch, before = st["epochs_done"], st["task_elapsed_s"]
    else:
        selection = ValidationSelection(method, scenario.tasks[: t + 1], config.eval_every, config.epochs)
        clock = Stopwatch()
        with clock.phase("begin_task"):
            method.begin_task(task)
        initial_epoch, before = 0, 0.0

    def elapsed():
        return before + time.perf_counter() - start

    callbacks = [
        StepTimer(clock),
        TimedCallback(selection, clock, "validation"),
        ProgressLogger(t, T, config.epochs, initial_epoch),
        TimedCallback(monitor.callback(method, task), clock, "monitoring"),
        NonFiniteGuard(t),
        TimedCallback(EpochCheckpoint(lambda done: save("epoch", t, done, selection, elapsed(), clock)),
                      clock, "checkpoint"),
    ]
    method.train_task(task, callbacks, initial_epoch=initial_epoch)
    seen = scenario.tasks[: t + 1]
    last = config.epochs - 1
    with clock.phase("evaluation"):
        # The classifier trained to the task's last epoch: the reference's figure.
        last_il, last_aware = evaluate(method, seen, "test")
    selected = last
    if config.restore_best:
        # Before evaluation, end_task (MAS takes theta* and importance here), samples,
        # export and the task-end checkpoint: all of them see the restored classifier,
        # and methods whose classifier carries over start the next task from it.
        with clock.phase("validation"):
            selected = selection.restore_best()
    with clock.phase("evaluation"):
        if selected == last:  # the weights trained to the end (restored or not)
            class_il, task_aware = last_il, last_aware
        else:
            class_il, task_aware = evaluate(method, seen, "test")
        # Restored: the best epoch's row is the one just measured; else evaluated aside.
        best_test = list(class_il) if selected == selection.best_epoch else selection.finish(last_il)
    with clock.phase("end_task"):
        method.end_task(task)
    with clock.phase("samples"):
        grid = write_sample_grid(method, scenario, t, path, config)
    if config.export:
        with clock.phase("export"):
            check_finite_for_export(method, t)
            exported = export.export_task(method, scenario, t + 1, path / "export")
        logging.info("exported %s", ", ".join(f"{k} -> {v}" for k, v in sorted(exported.items())))
    with clock.phase("evaluation"):
        rows["replay"].append(
            replay_accuracy(method, scenario, t, REPLAY_EVAL_PER_CLASS, seed=config.seed + 104729 * (t + 1))
        )
    # The task's wall time ends here: its results.json, TensorBoard summaries and
    # end-of-task checkpoint are written after it is recorded.
    rows["wall"].append(round(elapsed(), 3))
    rows["time"].append(clock.breakdown(rows["wall"][-1]))
    rows["acc"].append(class_il)
    rows["aware"].append(task_aware)
    rows["best"].append(best_test)
    rows["last_acc"].append(last_il)
    rows["last_aware"].append(last_aware)
    rows["best_epoch"].append(None if selection.best_epoch is None else selection.best_epoch + 1)
    rows["selected_epoch"].append(selected + 1)
    rows["summaries"].append(method.task_summary())
    results = _results(config, scenario, rows)
    io_utils.atomic_write_json(path / "results.json", results)
    monitor.task_end(method, t, results, grid, rows["replay"][-1])
    save("task_end", t, config.epochs, None, rows["wall"][-1])
    logging.info(
        "task %d/%d done in %.0fs: A_%d=%.4f (classifier of epoch %d; last epoch's A_%d=%.4f)  accuracies %s",
        t + 1, T, rows["wall"][-1], t + 1, results["average_accuracy"][-1], selected + 1, t + 1,
        results["last_epoch_average_accuracy"][-1], " ".join(f"{a:.3f}" for a in class_il),
    )
    logging.info(
        "task %d/%d time: %s", t + 1, T,
        ", ".join(f"{name} {seconds:.1f}s" for name, seconds in rows["time"][-1].items() if seconds),
    )
    return results


def check_finite_for_export(method: ContinualMethod, task: int) -> None:
    """Raise io_utils.NonFiniteError naming the first non-finite weight of the networks
    about to be exported (a SavedModel of NaN weights would serve NaN)."""
    network, _ = method.classifier_for_export()
    io_utils.check_finite(network.weights, what=f"classifier weights after task {task + 1}")
    memory = method.generator_for_export()
    if memory is not None:
        io_utils.check_finite(memory[0].weights, what=f"generator weights after task {task + 1}")


def _results(config, scenario, rows) -> dict:
    acc_rows, aware_rows, best_rows = rows["acc"], rows["aware"], rows["best"]
    replay_rows, summaries, wall = rows["replay"], rows["summaries"], rows["wall"]
    T = scenario.num_tasks
    summary = metrics.summary(_matrix(acc_rows, T))
    best = [r for r in best_rows if r is not None]
    return {
        "method": config.method,
        "dataset": scenario.dataset,
        "class_order": list(scenario.class_order),
        "class_names": list(scenario.class_names),
        "tasks": [list(t.classes) for t in scenario.tasks],
        "tasks_completed": len(acc_rows),
        "accuracy_matrix": _matrix(acc_rows, T),
        "average_accuracy": summary["average_accuracy"],
        "task_aware_accuracy_matrix": _matrix(aware_rows, T),
        "task_aware_average_accuracy": metrics.average_accuracy(_matrix(aware_rows, T)),
        "best_validation_accuracy_matrix": _matrix(best, T) if len(best) == len(best_rows) else None,
        "best_validation_average_accuracy": (
            metrics.average_accuracy(_matrix(best, T)) if len(best) == len(best_rows) else None
        ),
        # The classifier as trained to each task's last epoch (the reference's harness
        # reports these and keeps it); equal to the matrices above with --norestore_best.
        # For methods whose classifier carries over, task t's training started from
        # task t-1's selected classifier.
        "last_epoch_accuracy_matrix": _matrix(rows["last_acc"], T),
        "last_epoch_average_accuracy": metrics.average_accuracy(_matrix(rows["last_acc"], T)),
        "last_epoch_task_aware_accuracy_matrix": _matrix(rows["last_aware"], T),
        "last_epoch_task_aware_average_accuracy": metrics.average_accuracy(_matrix(rows["last_aware"], T)),
        # Per task, epochs counted from 1: the epoch of best mean validation accuracy
        # (null if unknown: tasks finished before it was recorded), and the epoch whose
        # classifier was evaluated above, exported, checkpointed and carried on (the
        # best with --restore_best, else the last).
        "best_validation_epoch": list(rows["best_epoch"]),
        "selected_epoch": list(rows["selected_epoch"]),
        "forgetting": summary["forgetting"],
        "average_forgetting": summary["average_forgetting"],
        "bwt": summary["bwt"],
        # Row t: after task t, the classifier's accuracy on generated images of every
        # seen class (class order); null for methods without a generator.
        "replay_accuracy": replay_rows,
        "generator_params": [s.get("generator_params") for s in summaries],
        "method_state": summaries,
        "wall_time_s": list(wall),
        # Per task, the seconds of each phase of Stopwatch.PHASES and "other".
        "time_breakdown_s": list(rows["time"]),
        # Versions and oneDNN on/off: both change float rounding, so a result is
        # reproduced bit for bit only under the same runtime.
        "runtime": runtime.describe(),
        "config": config.as_dict(),
    }


def format_summary(results: dict) -> str:
    """A small per-task table: A_t of the kept classifier (and the epoch it is from),
    of the last epoch's and at the best validation epoch, task-aware A_t, wall time."""
    lines = [
        f"{'task':>4} {'classes':<14} {'A_t':>7} {'epoch':>5} {'A_t(last)':>9} {'A_t(val-sel)':>12} "
        f"{'task-aware':>10} {'time[s]':>8}"
    ]
    n = len(results["average_accuracy"])
    best = results.get("best_validation_average_accuracy") or [math.nan] * n
    last = results.get("last_epoch_average_accuracy") or [math.nan] * n
    for t, a in enumerate(results["average_accuracy"]):
        lines.append(
            f"{t + 1:>4} {','.join(str(c) for c in results['tasks'][t]):<14} {a:>7.4f} "
            f"{results['selected_epoch'][t]:>5} {last[t]:>9.4f} {best[t]:>12.4f} "
            f"{results['task_aware_average_accuracy'][t]:>10.4f} {results['wall_time_s'][t]:>8.1f}"
        )
    return "\n".join(lines)
