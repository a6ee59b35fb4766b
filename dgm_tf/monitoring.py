"""TensorBoard summaries of a continual run, in ``<workdir>/tb``.

Tags form a hierarchy; tasks are numbered from 1 as on the console and in the export
versions:

* ``task_<t>/train/<name>`` every ``--log_every_steps`` iterations, the iteration's own
  values (step = global iteration); ``task_<t>/epoch/<name>`` the epoch means (step =
  global epoch). Names: d_loss, g_loss, gradient_penalty, wasserstein, c_loss, c_acc,
  c_loss_real, c_acc_real, c_loss_replay, c_acc_replay (epochs only; task 1 has no
  replay), mask_reg, s, lambda_mask (after its size scaling), val_acc; the comparison
  methods log c_loss, c_acc, loss (cross-entropy + penalty), mas_penalty (MAS) and,
  for joint, c_*_real (current task) and c_*_replay (stored earlier tasks).
* ``task_<t>/masks/<layer>`` histograms of the task's mask values each epoch (they
  should go to 0/1 as s rises); ``task_<t>/samples`` generated images of the task's
  own classes every ``--eval_every`` epochs; ``task_<t>/real_vs_replay`` (first row real, then
  replayed images).
* ``eval/A_t``, ``eval/task_aware_A_t``, ``eval/best_val_A_t``, ``eval/last_epoch_A_t``,
  ``eval/selected_epoch``, ``eval/accuracy/task_<j>``, ``eval/forgetting``, ``eval/bwt``
  (step = tasks done). A_t, task-aware A_t, the per-task accuracies, forgetting and BWT
  are of the classifier the task kept (the best validation epoch's with
  ``--restore_best``), ``last_epoch_A_t`` of its last epoch's, ``selected_epoch`` is the
  epoch kept (from 1); ``eval/accuracy_matrix`` image; ``eval/samples`` after each task.
* ``capacity/<layer>/{reserved,free,task_used}``, ``capacity/generator_params``,
  ``capacity/growth_params`` (what the last growth added) and
  ``capacity/<layer>/growth_channels`` (planned for the next task).
* ``replay/<class>``: the current classifier's accuracy on generated images of each
  seen class (step = tasks done).
* ``time/<phase>``, ``time/wall`` and ``time/non_step_fraction``: the task's seconds per
  phase (results.json ``time_breakdown_s``), its wall time and the share of it that is
  not training steps (wall less ``iterations``, over wall; step = tasks done).
* ``config/flags`` (text) and an HParams record of the resolved config whose metric is
  ``eval/A_t``, so runs compare in the HParams dashboard.
"""

from __future__ import annotations

import pathlib
import re

import keras
import numpy as np
import tensorflow as tf

from dgm_tf import io_utils

_EPOCH_KEYS = (
    "d_loss", "g_loss", "gradient_penalty", "wasserstein", "c_loss", "c_acc", "c_loss_real", "c_acc_real",
    "c_loss_replay", "c_acc_replay", "mask_reg", "s", "lambda_mask", "val_acc", "loss", "mas_penalty",
)
_STEP_SUFFIX = "_step"


def _tag_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") or "class"


def accuracy_matrix_image(matrix: list[list[float | None]], cell: int = 24) -> np.ndarray:
    """A heat map of the accuracy matrix (row i = after task i): white 0 to dark blue 1,
    grey above the diagonal. uint8 [T*cell, T*cell, 3]."""
    T = len(matrix)
    img = np.full((T * cell, T * cell, 3), 200, np.uint8)
    low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is None:
                continue
            color = low + (high - low) * float(np.clip(value, 0.0, 1.0))
            img[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = np.round(color).astype(np.uint8)
    return img


class Monitor:
    """Writes the run's TensorBoard summaries (one writer, one run directory)."""

    def __init__(self, logdir: pathlib.Path, config, scenario):
        self.logdir = pathlib.Path(logdir)
        self.config = config
        self.scenario = scenario
        self.writer = tf.summary.create_file_writer(str(self.logdir))
        self.global_step = 0
        self.global_epoch = 0
        self.last_params = None

    # -- run level -------------------------------------------------------------------

    def start(self) -> None:
        from tensorboard.plugins.hparams import api as hp

        cfg = self.config
        values = {}
        for key, value in cfg.as_dict().items():
            if value is None or isinstance(value, (list, tuple)):
                value = "" if value is None else ",".join(str(v) for v in value)
            values[key] = value
        with self.writer.as_default():
            hp.hparams_config(
                hparams=[hp.HParam(k) for k in values],
                metrics=[
                    hp.Metric("eval/A_t", display_name="A_T (class-incremental)"),
                    hp.Metric("eval/task_aware_A_t", display_name="A_T task-aware"),
                    hp.Metric("eval/best_val_A_t", display_name="A_T at best validation"),
                    hp.Metric("eval/last_epoch_A_t", display_name="A_T of the last epoch"),
                ],
            )
            hp.hparams(values, trial_id=str(self.logdir.parent.name))
            flags = "\n".join(f"    {line}" for line in cfg.to_flags())  # markdown code block
            tf.summary.text("config/flags", flags, step=0)
        self.writer.flush()

    def state(self) -> dict:
        return {"global_step": self.global_step, "global_epoch": self.global_epoch, "last_params": self.last_params}

    def restore(self, state: dict) -> None:
        self.global_step, self.global_epoch = state["global_step"], state["global_epoch"]
        self.last_params = state["last_params"]

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    # -- during a task ---------------------------------------------------------------

    def callback(self, method, task) -> "MonitorCallback":
        return MonitorCallback(self, method, task)

    # -- after a task ----------------------------------------------------------------

    def task_end(self, method, task_index: int, results: dict, samples: np.ndarray | None, replay_row) -> None:
        t = task_index + 1
        names = self.scenario.class_names
        with self.writer.as_default(step=t):
            tf.summary.scalar("eval/A_t", results["average_accuracy"][task_index])
            tf.summary.scalar("eval/task_aware_A_t", results["task_aware_average_accuracy"][task_index])
            best = results.get("best_validation_average_accuracy")
            if best:
                tf.summary.scalar("eval/best_val_A_t", best[task_index])
            last = results.get("last_epoch_average_accuracy")
            if last:
                tf.summary.scalar("eval/last_epoch_A_t", last[task_index])
            if results.get("selected_epoch"):
                tf.summary.scalar("eval/selected_epoch", results["selected_epoch"][task_index])
            for j, acc in enumerate(results["accuracy_matrix"][task_index][: task_index + 1]):
                tf.summary.scalar(f"eval/accuracy/task_{j + 1}", acc)
            if results.get("average_forgetting") is not None:
                tf.summary.scalar("eval/forgetting", results["average_forgetting"])
            if results.get("bwt") is not None:
                tf.summary.scalar("eval/bwt", results["bwt"])
            matrix = [row for row in results["accuracy_matrix"][: task_index + 1]]
            tf.summary.image("eval/accuracy_matrix", accuracy_matrix_image(matrix)[None], max_outputs=1)
            if samples is not None:
                tf.summary.image("eval/samples", samples[None], max_outputs=1)
            if replay_row is not None:
                seen = [label for task in self.scenario.tasks[:t] for label in task.labels]
                for label, acc in zip(seen, replay_row):
                    tf.summary.scalar(f"replay/{label:02d}_{_tag_safe(names[label])}", acc)
            for layer, fractions in method.capacity().items():
                for key, value in fractions.items():
                    tf.summary.scalar(f"capacity/{layer}/{key}", value)
            summary = method.task_summary()
            params = summary.get("generator_params")
            if params is not None:
                tf.summary.scalar("capacity/generator_params", params)
                if self.last_params is not None:
                    tf.summary.scalar("capacity/growth_params", params - self.last_params)
                self.last_params = params
            for layer, add in zip(("conv1", "conv2", "conv3"), summary.get("growth_channels") or ()):
                tf.summary.scalar(f"capacity/{layer}/growth_channels", add)
            phases = (results.get("time_breakdown_s") or [])[task_index : task_index + 1]
            wall = (results.get("wall_time_s") or [])[task_index : task_index + 1]
            if phases and wall and wall[0] > 0:
                for phase, seconds in phases[0].items():
                    tf.summary.scalar(f"time/{phase}", seconds)
                tf.summary.scalar("time/wall", wall[0])
                if "iterations" in phases[0]:
                    tf.summary.scalar("time/non_step_fraction", (wall[0] - phases[0]["iterations"]) / wall[0])
        self.writer.flush()


class MonitorCallback(keras.callbacks.Callback):
    """Per-step and per-epoch summaries of one task's training."""

    def __init__(self, monitor: Monitor, method, task):
        super().__init__()
        self.monitor, self.method, self.task = monitor, method, task
        self.prefix = f"task_{task.index + 1}"
        self.every = monitor.config.log_every_steps

    def on_train_batch_end(self, batch, logs=None):
        m = self.monitor
        m.global_step += 1
        if not logs or m.global_step % self.every:
            return
        with m.writer.as_default(step=m.global_step):
            for key, value in logs.items():
                if key.endswith(_STEP_SUFFIX):
                    tf.summary.scalar(f"{self.prefix}/train/{key[: -len(_STEP_SUFFIX)]}", float(value))

    def on_epoch_end(self, epoch, logs=None):
        m = self.monitor
        m.global_epoch += 1
        logs = logs or {}
        with m.writer.as_default(step=m.global_epoch):
            replaying = self.method.replay_examples(1) is not None
            for key in _EPOCH_KEYS:
                if key in logs and not (key.endswith("_replay") and not replaying):
                    tf.summary.scalar(f"{self.prefix}/epoch/{key}", float(logs[key]))
            for layer, values in self.method.mask_values().items():
                tf.summary.histogram(f"{self.prefix}/masks/{layer}", values.ravel(), buckets=20)
            cfg = m.config
            # A method that decides a task's length (NISPA's phases) has no known last
            # epoch: its end-of-task images are refreshed at every evaluation epoch.
            own_length = self.method.max_task_epochs(self.task) is not None
            last = epoch == cfg.epochs - 1 or (own_length and epoch % cfg.eval_every == 0)
            if epoch % cfg.eval_every == 0 or last:
                # The task's own classes only: they are what this task trains. Every seen
                # class is drawn once per task (``eval/samples``); drawing them all here
                # cost DGM one generator call per earlier task at every such epoch, the
                # largest part of ``monitoring`` at 10 tasks (WORKSPACE, Performance).
                grid = sample_grid(self.method, m.scenario, self.task.index, cfg.samples_per_class,
                                   seed=cfg.seed + 7919 * (self.task.index + 1), labels=self.task.labels)
                if grid is not None:
                    tf.summary.image(f"{self.prefix}/samples", grid[None], max_outputs=1)
            if last:
                self._real_vs_replay()
        m.writer.flush()

    def _real_vs_replay(self):
        n = self.monitor.config.samples_per_class
        replay = self.method.replay_examples(4 * n)
        if replay is None:
            return
        real = self.task.x_train[:n]
        images = np.concatenate([real, replay[0][: 4 * n]])
        tf.summary.image(
            f"{self.prefix}/real_vs_replay", io_utils.image_grid(images, ncols=n)[None], max_outputs=1
        )


def sample_grid(method, scenario, task: int, per_class: int, seed: int, labels=None) -> np.ndarray | None:
    """uint8 grid of generated images: one row per class of ``labels`` (default: every
    class seen up to ``task``), ``per_class`` columns. DGM draws each task's noise from
    ``seed`` + that task, in label order, so a class's row is the same in any grid of
    whole tasks (the per-epoch grid holds one task, the task-end grid all seen ones)."""
    if labels is None:
        labels = [label for t in scenario.tasks[: task + 1] for label in t.labels]
    labels = np.repeat(np.array(labels, np.int32), per_class)
    images = method.sample(labels, seed=seed)
    if images is None:
        return None
    return io_utils.image_grid(images, ncols=per_class)
