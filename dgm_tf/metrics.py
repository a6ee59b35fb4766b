"""Class-incremental continual-learning metrics as pure numpy functions.

Everything here works on the *accuracy matrix* ``R``: ``R[i][j]`` is the test
accuracy on the classes of task ``j`` measured right after training task ``i``,
as a fraction in ``[0, 1]``.  Only the lower triangle (``j <= i``) is defined.
``R`` may be given as

* a list of rows, where entries above the diagonal are ``None`` or simply
  missing (row ``i`` needs at least ``i + 1`` entries), or
* a 2-D numpy array with ``NaN`` above the diagonal.

Entries above the diagonal are never read, whatever they hold.  Tasks are
indexed from 0; ``T`` below is the index of the last row, so ``R`` describes
``T + 1`` tasks.

References:
    Ostapenko, Puscas, Klein, Jahnichen, Nabi. "Learning to Remember: A
    Synaptic Plasticity Driven Framework for Continual Learning", CVPR 2019
    (DGM; reports A5 / A10, the average accuracy after 5 / 10 tasks).
    Chaudhry, Dokania, Ajanthan, Torr. "Riemannian Walk for Incremental
    Learning: Understanding Forgetting and Intransigence", ECCV 2018
    (forgetting measure, Sec. 4.1).
    Lopez-Paz, Ranzato. "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017 (backward transfer, Sec. 2 / eq. 2-3).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = [
    "accuracy_from_predictions",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "forgetting",
    "summary",
    "task_aware_predictions",
]


def _lower_triangle(R: Any) -> list[list[float]]:
    """Validates ``R`` and returns its lower triangle as ragged float rows.

    Row ``i`` of the result has exactly ``i + 1`` floats in ``[0, 1]``.

    Raises:
        ValueError: if ``R`` is empty, not 2-D, a row is too short, or an entry
            on or below the diagonal is not a finite number in ``[0, 1]``.
            The message names the offending row / column.
    """
    if isinstance(R, np.ndarray):
        if R.ndim != 2:
            raise ValueError(f"accuracy matrix must be 2-D, got an array of shape {R.shape}")
        rows = [list(r) for r in R]
    elif isinstance(R, (str, bytes)) or not isinstance(R, Sequence):
        raise ValueError(f"accuracy matrix must be a list of rows or a 2-D array, got {type(R).__name__}")
    else:
        rows = list(R)
    if not rows:
        raise ValueError("accuracy matrix is empty: it needs at least one row (one task)")

    out: list[list[float]] = []
    for i, row in enumerate(rows):
        if isinstance(row, np.ndarray):
            if row.ndim != 1:
                raise ValueError(f"row {i} of the accuracy matrix must be 1-D, got shape {row.shape}")
            row = list(row)
        elif isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"row {i} of the accuracy matrix must be a sequence, got {type(row).__name__}")
        if len(row) < i + 1:
            raise ValueError(
                f"row {i} of the accuracy matrix has {len(row)} entries; it needs at least {i + 1} "
                f"(columns 0..{i})"
            )
        values = []
        for j in range(i + 1):
            v = row[j]
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                raise ValueError(f"accuracy matrix entry R[{i}][{j}] must be a number, got {v!r}")
            v = float(v)
            if not (0.0 <= v <= 1.0):  # also rejects NaN
                raise ValueError(f"accuracy matrix entry R[{i}][{j}] = {v!r} is not a fraction in [0, 1]")
            values.append(v)
        out.append(values)
    return out


def average_accuracy(R: Any) -> list[float]:
    """Average accuracy after each task.

    ``A_t = 1/(t+1) * sum_{j=0}^{t} R[t][j]`` for every row ``t`` (tasks
    indexed from 0).  ``A_t`` of the 5th / 10th row is the A5 / A10 reported
    by DGM (Ostapenko et al., CVPR 2019).

    Returns:
        ``[A_0, ..., A_T]``, one float per row of ``R``.
    """
    tri = _lower_triangle(R)
    return [math.fsum(row) / len(row) for row in tri]


def forgetting(R: Any) -> list[float | None]:
    """Per-task forgetting after the last task (Chaudhry et al., ECCV 2018).

    With ``T`` the last row index, for each earlier task ``j < T``:
    ``f_j = max_{j <= i < T} R[i][j] - R[T][j]``,
    i.e. the best accuracy task ``j`` ever had before the final task minus its
    final accuracy.  (Chaudhry et al. write ``max_{l in 1..k-1} a_{l,j}``;
    entries with ``i < j`` are undefined here, so the max starts at ``i = j``.)
    The value can be negative if a task improved later.

    Returns:
        A list of length ``T + 1``; entry ``T`` is ``None`` (the last task has
        not been followed by any other task, so it has no forgetting).
    """
    tri = _lower_triangle(R)
    T = len(tri) - 1
    result: list[float | None] = []
    for j in range(T):
        best_before = max(tri[i][j] for i in range(j, T))
        result.append(best_before - tri[T][j])
    result.append(None)
    return result


def average_forgetting(R: Any) -> float | None:
    """Mean forgetting over earlier tasks: ``F = 1/T * sum_{j<T} f_j``.

    This is Chaudhry et al.'s ``F_k`` with ``k = T + 1`` tasks seen.

    Returns:
        The mean of :func:`forgetting` over ``j < T``, or ``None`` when ``R``
        has a single row (``T == 0``).
    """
    per_task = forgetting(R)[:-1]
    if not per_task:
        return None
    return math.fsum(per_task) / len(per_task)


def backward_transfer(R: Any) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato, NeurIPS 2017, GEM).

    With ``T`` the last row index (0-based, so ``T + 1`` tasks):
    ``BWT = 1/T * sum_{j=0}^{T-1} (R[T][j] - R[j][j])``.

    GEM writes this for ``T`` tasks indexed from 1 as
    ``BWT = 1/(T-1) * sum_{i=1}^{T-1} (R_{T,i} - R_{i,i})``; that is the same
    quantity: the divisor is the number of tasks minus one, i.e. the number of
    tasks that were followed by at least one other task.  Negative BWT means
    forgetting.

    Returns:
        The BWT as a float, or ``None`` with a single task.
    """
    tri = _lower_triangle(R)
    T = len(tri) - 1
    if T == 0:
        return None
    return math.fsum(tri[T][j] - tri[j][j] for j in range(T)) / T


def accuracy_from_predictions(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of positions where ``pred == labels``.

    Args:
        pred: predicted labels, any shape.
        labels: true labels, the same shape as ``pred``.

    Raises:
        ValueError: if the shapes differ or there are no predictions.
    """
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred has shape {pred.shape} but labels have shape {labels.shape}")
    if pred.size == 0:
        raise ValueError("cannot compute the accuracy of zero predictions")
    return float(np.mean(pred == labels))


def task_aware_predictions(logits: np.ndarray, task_labels: Sequence[int]) -> np.ndarray:
    """Argmax restricted to one task's label columns (task-incremental evaluation).

    For each row of ``logits`` picks, among the columns listed in
    ``task_labels`` only, the one with the largest logit, and returns it as a
    label of the full label space.  Columns outside ``task_labels`` are ignored
    even if they are larger.  Ties go to the label listed first.

    Args:
        logits: ``[N, num_classes]`` scores (logits or probabilities).
        task_labels: the task's class ids, each in ``[0, num_classes)``.

    Returns:
        ``int64`` array of shape ``[N]`` with values from ``task_labels``.

    Raises:
        ValueError: if ``logits`` is not 2-D, ``task_labels`` is empty,
            contains a non-integer, or a label out of range.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [N, num_classes], got shape {logits.shape}")
    labels = np.asarray(task_labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"task_labels must be a non-empty 1-D sequence of ints, got {task_labels!r}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"task_labels must be integers, got dtype {labels.dtype}")
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"task_labels {labels.tolist()} out of range for {num_classes} logit columns")
    labels = labels.astype(np.int64)
    return labels[np.argmax(logits[:, labels], axis=1)]


def summary(R: Any) -> dict:
    """All metrics of ``R`` in one dict (JSON-ready: floats and ``None``).

    Keys: ``average_accuracy`` (list, one per row), ``forgetting`` (list, last
    entry ``None``), ``average_forgetting`` (float or ``None``), ``bwt``
    (float or ``None``).
    """
    _lower_triangle(R)  # validate once up front for a single clear error
    return {
        "average_accuracy": average_accuracy(R),
        "forgetting": forgetting(R),
        "average_forgetting": average_forgetting(R),
        "bwt": backward_transfer(R),
    }
