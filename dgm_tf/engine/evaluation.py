"""What a task's end measures and reports: class-incremental and task-aware accuracy
on a split (``evaluate``), the classifier's accuracy on generated images of each seen
class (``replay_accuracy``), the sample grid ``samples/task_XX.png``
(``write_sample_grid``), results.json (``_results``) and its console table
(``format_summary``).
"""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import numpy as np

from dgm_tf import io_utils, metrics, monitoring, runtime
from dgm_tf.engine.distribute import replicas_in_sync
from dgm_tf.config import Config
from dgm_tf.data import Scenario, TaskData
from dgm_tf.methods.base import ContinualMethod

EVAL_BATCH = 500
REPLAY_EVAL_PER_CLASS = 100


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
        # replicas: of the --distribution strategy (the update is one device's).
        "runtime": {**runtime.describe(), "replicas": replicas_in_sync()},
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
