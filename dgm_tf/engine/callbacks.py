"""The Keras callbacks the task loop hands to ``method.train_task``, one service each:
``ValidationSelection`` (validates every ``--eval_every`` epochs and keeps the best
epoch's classifier), ``ProgressLogger`` (a console line per epoch), ``NonFiniteGuard``
(stops at the first non-finite loss with ``TrainingError``) and ``EpochCheckpoint`` (a
checkpoint after every epoch); ``epoch_budget`` and ``epochs_run``: how many epochs a
method trains a task (``--epochs``, or its own phase loop's count: NISPA).
"""

from __future__ import annotations

import time
from typing import Sequence

import keras
import numpy as np
from absl import logging

from dgm_tf.data import TaskData
from dgm_tf.engine.evaluation import evaluate
from dgm_tf.methods.base import ContinualMethod


def epoch_budget(method: ContinualMethod, task: TaskData, epochs: int) -> tuple[int, bool]:
    """How many epochs ``method.train_task`` runs for ``task``, before it runs.

    ``(epochs, False)``: exactly ``epochs`` (``--epochs``), the contract of every method
    whose ``max_task_epochs`` is None. A method that runs its own loop (NISPA's phases)
    returns a number there: then ``(that, True)``, the task runs *at most* that many
    epochs, numbered 0, 1, 2, ... across its phases as the callbacks see them
    (``fit_epochs`` with the running index), and the method reports after
    ``train_task`` how many it ran (``epochs_run``). Every per-epoch service (checkpoint,
    validation selection, progress, monitoring, timing, the non-finite guard) sees those
    epochs like any others; a task resumed mid-way gets ``initial_epoch`` = the epochs
    done, as for every method.
    """
    most = method.max_task_epochs(task)
    return (epochs, False) if most is None else (int(most), True)


def epochs_run(method: ContinualMethod, epochs: int) -> tuple[int, int | None]:
    """After ``train_task``: (epochs the task ran, the epoch (0-based) whose classifier
    the method left in place, or None when the engine selects one with
    ``--restore_best``). ``(epochs, None)`` when ``task_epochs_run()`` is None. A method
    that names its epoch selects its own classifier (NISPA: the revert to the previous
    phase), and the engine does not replace it (``--restore_best`` has no effect)."""
    ran = method.task_epochs_run()
    if ran is None:
        return epochs, None
    count, kept = ran
    return int(count), None if kept is None else int(kept)


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

    def finish(self, final_test: list[float], final_epoch: int | None = None) -> list[float] | None:
        """The best epoch's test row, the weights in place left as they are;
        ``final_test`` is the row of those weights, the classifier of ``final_epoch``
        (default: the last epoch), reused when the best epoch is that one (the same
        weights)."""
        if self.best_epoch is None or self.best_weights is None:
            return self.best_test
        if self.best_epoch == (self.epochs - 1 if final_epoch is None else final_epoch):
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
    """One console line per epoch: losses, epoch time and the task's ETA. With
    ``at_most`` (a method that decides its own length, ``epoch_budget``) ``epochs`` is
    an upper bound, and the line says so (``epoch 7/<=130``, ``task ETA <=``)."""

    KEYS = ("d_loss", "g_loss", "wasserstein", "gradient_penalty", "mask_reg", "c_loss", "c_acc", "mas_penalty",
            "phase", "task_val_acc", "val_acc", "s")

    def __init__(self, task: int, num_tasks: int, epochs: int, first_epoch: int = 0, at_most: bool = False):
        super().__init__()
        self.task, self.num_tasks, self.epochs, self.first_epoch = task, num_tasks, epochs, first_epoch
        self.bound = "<=" if at_most else ""
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (epoch + 1 - self.first_epoch) * (self.epochs - epoch - 1)
        values = " ".join(f"{k}={logs[k]:.4g}" for k in self.KEYS if k in logs)
        logging.info(
            "task %d/%d epoch %d/%s%d %s (%.1fs, task ETA %s%.0fs)",
            self.task + 1, self.num_tasks, epoch + 1, self.bound, self.epochs, values, elapsed, self.bound, eta,
        )


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says where."""


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
