"""Class-incremental split of a :class:`~dgm_tf.data.sources.RawDataset` into tasks.

A benchmark is a class order cut into tasks of ``classes_per_task`` classes.
Model label ``i`` stands for original class ``class_order[i]``, so one
classifier head grows over the labels ``0, 1, 2, ...`` as tasks arrive.

Per class, a seeded shuffle holds out a validation share of the training
images (the reference, SAP/machine-learning-dgm, holds out 15 %) and the rest
is optionally capped; every test image of the class is kept.  Randomness comes
from generators keyed on ``(seed, purpose, class id or task index)``, so a
class's split does not depend on the class order or the number of tasks.

A scenario carries a fingerprint of its data (:func:`scenario_fingerprint`): per task
and per split, sha256 digests of the source images (uint8, before resizing) and of the
labels, plus the class order and names. A run records it in its checkpoints, and a
resume whose data differ (an edited file, one image added to a class, which reshuffles
its split, a newer prepared dataset) is refused, naming what changed
(:func:`fingerprint_differences`). The uint8 source is hashed rather than the model's
float images because resizing runs in float, whose last bits may differ between CPUs;
a run resumed on another machine has the same data.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dgm_tf.data.sources import DataError, RawDataset

__all__ = [
    "Scenario",
    "TaskData",
    "fingerprint_differences",
    "make_scenario",
    "resolve_class_order",
    "scenario_fingerprint",
    "to_model_images",
]

# Stream ids that keep the per-class split, the per-task shuffle and a random class
# order independent.
_CLASS_SPLIT_STREAM = 0
_TASK_SHUFFLE_STREAM = 1
_CLASS_ORDER_STREAM = 3
_RANDOM_PREFIX = "random:"
FINGERPRINT_VERSION = 1
_SPLITS = (("train", "train"), ("val", "validation"), ("test", "test"))


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """The data of one task, ready for the model.

    Images are float32 ``[n, size, size, C]`` in ``[-1, 1]``; labels are int32
    model labels (positions in the scenario's class order).  ``eq=False``:
    compared by identity.

    Attributes:
        index: Task index ``t``, 0-based.
        classes: Original class ids of this task, in class-order order.
        labels: Model labels of ``classes`` (their positions in the order).
        x_train, y_train: Training images (classes mixed by a seeded shuffle).
        x_val, y_val: Held-out validation images from the training split.
        x_test, y_test: All test images of the task's classes.
    """

    index: int
    classes: tuple[int, ...]
    labels: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __repr__(self) -> str:
        return (
            f"TaskData(index={self.index}, classes={self.classes}, labels={self.labels}, "
            f"train={len(self.y_train)}, val={len(self.y_val)}, test={len(self.y_test)})"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    """A class-incremental benchmark: a class order cut into tasks.

    Attributes:
        dataset: ``RawDataset.name`` of the source.
        class_order: Original class ids actually used (the first
            ``num_tasks * classes_per_task`` of the requested order); model
            label ``i`` is class ``class_order[i]``.
        class_names: Names in model-label order.
        classes_per_task: Classes per task.
        tasks: The tasks in training order.
        image_shape: ``(size, size, C)`` of the model images.
        source_image_shape: ``(H, W, C)`` of the dataset's images before resizing
            (what a deployed classifier receives).
        split_digests: Per task, per split (``train``, ``val``, ``test``): image
            count and sha256 of the uint8 source images and of the labels, computed
            by :func:`make_scenario`; see :func:`scenario_fingerprint`.
    """

    dataset: str
    class_order: tuple[int, ...]
    class_names: tuple[str, ...]
    classes_per_task: int
    tasks: tuple[TaskData, ...]
    image_shape: tuple[int, int, int]
    source_image_shape: tuple[int, int, int]
    split_digests: tuple[Mapping[str, Mapping[str, Any]], ...] | None = dataclasses.field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        """Number of classes over all tasks."""
        return len(self.class_order)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)


def to_model_images(
    x_uint8: np.ndarray, size: int = 32, *, batch_size: int = 4096
) -> np.ndarray:
    """Converts uint8 images to the model's float32 ``[-1, 1]`` input.

    ``x / 255``, resized bilinearly to ``size x size`` (``tf.image.resize``,
    half-pixel centres, no antialiasing), then ``* 2 - 1``.  This mirrors the
    reference (SAP/machine-learning-dgm, ``dataloaders/split_MNIST.py``), which
    resizes MNIST 28 -> 32 with torchvision ``Resize(32)`` and maps to [-1, 1]
    with ``Normalize((0.5,), (0.5,))``.  (torchvision resizes the uint8 PIL
    image before ``ToTensor``, so its values are rounded to 1/255 steps; ours
    are not.  The difference is below one grey level.)

    Works in batches of ``batch_size`` images so that 70k images never exist as
    one float tensor at the source size on top of the output; deterministic.

    Args:
        x_uint8: uint8 ``[N, H, W, C]`` images.
        size: Output height and width.
        batch_size: Images resized per call.

    Returns:
        float32 ``[N, size, size, C]`` in ``[-1, 1]``.
    """
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(
            f"expected uint8 images [N, H, W, C], got dtype {x.dtype} shape {x.shape}"
        )
    if size < 1 or batch_size < 1:
        raise ValueError(f"size and batch_size must be >= 1, got {size} and {batch_size}")
    n, height, width, channels = x.shape
    out = np.empty((n, size, size, channels), dtype=np.float32)
    if n == 0:
        return out
    resize = (height, width) != (size, size)
    if resize:
        import tensorflow as tf  # Deferred: importing TF costs ~2 s, only resizing needs it.

    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size].astype(np.float32) / np.float32(255.0)
        if resize:
            batch = tf.image.resize(
                batch, (size, size), method="bilinear", antialias=False
            ).numpy()
        out[start : start + len(batch)] = batch * np.float32(2.0) - np.float32(1.0)
    # Bilinear weights sum to one, so values stay in range up to float rounding.
    np.clip(out, -1.0, 1.0, out=out)
    return out


# ------------------------------------------------------------------ validation


def _as_int(value: object, flag: str, what: str = "an integer") -> int:
    """Converts an int-like flag value (int, numpy int, numeric string) to int."""
    if isinstance(value, bool):
        raise DataError(f"{flag}: expected {what}, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise DataError(f"{flag}: expected {what}, got {value!r}")


def resolve_class_order(class_order: Sequence[int] | str | None, class_ids: Sequence[int]) -> list[int] | None:
    """Turns ``random:<seed>`` into an explicit order over ``class_ids``.

    The order is a permutation of the sorted ids drawn from
    ``np.random.default_rng((seed, 3))``, so it depends only on the seed and the set of
    ids. ``None`` and explicit orders pass through (explicit ones as a list).
    """
    if isinstance(class_order, str) and class_order.strip().startswith(_RANDOM_PREFIX):
        text = class_order.strip()[len(_RANDOM_PREFIX) :]
        seed = _as_int(text, "--class_order", "random:<seed> with an integer seed >= 0")
        if seed < 0:
            raise DataError(f"--class_order: the seed of random:<seed> must be >= 0, got {seed}")
        ids = sorted(int(c) for c in class_ids)
        rng = np.random.default_rng((seed, _CLASS_ORDER_STREAM))
        return [ids[i] for i in rng.permutation(len(ids))]
    if class_order is None:
        return None
    return class_order


def _resolve_class_order(raw: RawDataset, class_order: Sequence[int] | str | None) -> list[int]:
    """Validates ``class_order`` against the dataset (or derives it)."""
    present = set(np.unique(raw.y_train).tolist())
    if not present:
        raise DataError(f"{raw.name}: the training split is empty")
    class_order = resolve_class_order(class_order, sorted(present))
    if class_order is None:
        return sorted(present)
    if isinstance(class_order, np.ndarray):
        class_order = class_order.tolist()
    elif isinstance(class_order, str):  # e.g. "3,1,2" or "3 1 2" from a flagfile
        class_order = class_order.replace(",", " ").split()
    if isinstance(class_order, (str, bytes)) or not isinstance(class_order, Sequence):
        raise DataError(f"--class_order: expected a list of class ids, got {class_order!r}")
    order = [_as_int(c, "--class_order", "integer class ids") for c in class_order]
    if not order:
        raise DataError("--class_order: the class order is empty")
    repeated = sorted(c for c, k in collections.Counter(order).items() if k > 1)
    if repeated:
        raise DataError(f"--class_order: class ids {repeated} appear more than once in {order}")
    unknown = [c for c in order if not 0 <= c < raw.num_classes]
    if unknown:
        raise DataError(
            f"--class_order: unknown class ids {unknown}; {raw.name} has classes "
            f"0..{raw.num_classes - 1}"
        )
    absent = [c for c in order if c not in present]
    if absent:
        raise DataError(
            f"--class_order: classes {absent} have no training images in {raw.name}"
        )
    return order


def _digest(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    if a.size:
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _split_digest(source_images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {"n": int(len(labels)), "images": _digest(source_images), "labels": _digest(labels)}


def scenario_fingerprint(scenario: Scenario) -> dict[str, Any]:
    """A JSON-ready fingerprint of the scenario's data.

    Holds the class order, class names, classes per task, image shapes and, per task,
    its classes and per split (train, val, test) the image count and the sha256 of the
    uint8 source images (before resizing) and of the model labels, in the order the
    scenario feeds them. Cheap: one sha256 pass over the used images (0.1-0.2 s for
    the 70,000 images of Fashion-MNIST); computed once by :func:`make_scenario`.

    Raises:
        ValueError: the scenario was not built by :func:`make_scenario`.
    """
    if scenario.split_digests is None:
        raise ValueError("the scenario has no data digests: build it with make_scenario")
    return {
        "version": FINGERPRINT_VERSION,
        "class_order": [int(c) for c in scenario.class_order],
        "class_names": list(scenario.class_names),
        "classes_per_task": int(scenario.classes_per_task),
        "image_shape": list(scenario.image_shape),
        "source_image_shape": list(scenario.source_image_shape),
        "tasks": [
            {"classes": [int(c) for c in task.classes], **{k: dict(v) for k, v in digests.items()}}
            for task, digests in zip(scenario.tasks, scenario.split_digests)
        ],
    }


def fingerprint_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`scenario_fingerprint`s, one phrase each, in the
    order class order, class names, shapes, tasks (e.g. ``"class order differs (the run
    has [1, 7], now [7, 1])"``, ``"task 2 test split differs (images)"``,
    ``"task 1 train split differs (54 images in the run, 55 now)"``); empty if equal."""
    if recorded.get("version") != current.get("version"):
        return [
            f"the run's data fingerprint has version {recorded.get('version')}, this version writes "
            f"{current.get('version')}: they cannot be compared"
        ]
    out = []
    for key, what in (
        ("class_order", "class order"), ("class_names", "class names"),
        ("classes_per_task", "classes per task"), ("image_shape", "model image shape"),
        ("source_image_shape", "source image shape"),
    ):
        if recorded.get(key) != current.get(key):
            out.append(f"{what} differs (the run has {recorded.get(key)}, now {current.get(key)})")
    old_tasks, new_tasks = recorded.get("tasks", []), current.get("tasks", [])
    if len(old_tasks) != len(new_tasks):
        out.append(f"number of tasks differs (the run has {len(old_tasks)}, now {len(new_tasks)})")
    for t, (old, new) in enumerate(zip(old_tasks, new_tasks)):
        if old.get("classes") != new.get("classes"):
            out.append(f"task {t + 1} classes differ (the run has {old.get('classes')}, now {new.get('classes')})")
            continue
        for key, name in _SPLITS:
            a, b = old.get(key, {}), new.get(key, {})
            if a.get("n") != b.get("n"):
                out.append(f"task {t + 1} {name} split differs ({a.get('n')} images in the run, {b.get('n')} now)")
                continue
            changed = [part for part in ("images", "labels") if a.get(part) != b.get(part)]
            if changed:
                out.append(f"task {t + 1} {name} split differs ({' and '.join(changed)})")
    return out


def _round_half_up(x: float) -> int:
    """Rounds to the nearest integer, halves up (unlike Python's banker's round)."""
    return int(math.floor(x + 0.5))


# -------------------------------------------------------------------- scenario


def make_scenario(
    raw: RawDataset,
    *,
    class_order: Sequence[int] | str | None,
    classes_per_task: int,
    num_tasks: int | None,
    train_examples_per_class: int = 0,
    validation_fraction: float = 0.15,
    seed: int = 0,
    image_size: int = 32,
) -> Scenario:
    """Splits a dataset into class-incremental tasks.

    Args:
        raw: The dataset.
        class_order: Original class ids in task order; ``None`` for the sorted
            ids present in the training split; ``"random:<seed>"`` for a seeded
            permutation of those ids (see :func:`resolve_class_order`).  Model
            label ``i`` is ``class_order[i]``.
        classes_per_task: Classes per task, >= 1.  Without ``num_tasks`` it must
            divide the number of classes.
        num_tasks: Number of tasks, or ``None`` for
            ``len(class_order) // classes_per_task``.  If given,
            ``num_tasks * classes_per_task`` must not exceed the number of
            classes; only that many leading classes are used.
        train_examples_per_class: Cap on training images per class after the
            validation hold-out; 0 keeps all.
        validation_fraction: Share of each class's training images held out,
            ``round(validation_fraction * n)`` (halves up); in ``(0, 1)``.
        seed: Seed (>= 0) of the per-class hold-out and the per-task shuffle.
        image_size: Height and width of the model images.

    Returns:
        The scenario; its ``class_order`` holds only the classes used.

    Raises:
        DataError: naming the flag (``--class_order``, ``--classes_per_task``,
            ``--num_tasks``, ``--train_examples_per_class``,
            ``--validation_fraction``, ``--seed``) and the offending value.
    """
    order = _resolve_class_order(raw, class_order)
    cpt = _as_int(classes_per_task, "--classes_per_task", "a positive integer")
    if cpt < 1:
        raise DataError(f"--classes_per_task must be >= 1, got {cpt}")
    if num_tasks is None:
        if len(order) % cpt:
            raise DataError(
                f"--classes_per_task={cpt} does not divide the {len(order)} classes of the "
                f"class order {order}; change it or set --num_tasks"
            )
        n_tasks = len(order) // cpt
    else:
        n_tasks = _as_int(num_tasks, "--num_tasks", "a positive integer")
        if n_tasks < 1:
            raise DataError(f"--num_tasks must be >= 1, got {n_tasks}")
        if n_tasks * cpt > len(order):
            raise DataError(
                f"--num_tasks={n_tasks} with --classes_per_task={cpt} needs "
                f"{n_tasks * cpt} classes but the class order has {len(order)}: {order}"
            )
    cap = _as_int(train_examples_per_class, "--train_examples_per_class", "an integer >= 0")
    if cap < 0:
        raise DataError(f"--train_examples_per_class must be >= 0 (0 = all), got {cap}")
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, numbers.Real):
        raise DataError(f"--validation_fraction: expected a number, got {validation_fraction!r}")
    if not 0.0 < float(validation_fraction) < 1.0:
        raise DataError(
            f"--validation_fraction must be strictly between 0 and 1, got {validation_fraction}"
        )
    seed = _as_int(seed, "--seed", "an integer >= 0")
    if seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}")
    size = _as_int(image_size, "image_size", "a positive integer")
    if size < 1:
        raise DataError(f"image_size must be >= 1, got {size}")

    order = order[: n_tasks * cpt]
    label_of = {c: i for i, c in enumerate(order)}

    # Per class: seeded shuffle, hold out validation, cap the rest.
    train_idx: dict[int, np.ndarray] = {}
    val_idx: dict[int, np.ndarray] = {}
    test_idx: dict[int, np.ndarray] = {}
    for c in order:
        idx = np.flatnonzero(raw.y_train == c)
        rng = np.random.default_rng((seed, _CLASS_SPLIT_STREAM, c))
        idx = idx[rng.permutation(idx.size)]
        n_val = _round_half_up(float(validation_fraction) * idx.size)
        train = idx[n_val:]
        if cap:
            train = train[:cap]
        if train.size == 0:
            raise DataError(
                f"--validation_fraction={validation_fraction} leaves no training images for "
                f"class {c} ({raw.class_names[c]!r}), which has {idx.size} in {raw.name}"
            )
        test = np.flatnonzero(raw.y_test == c)
        if test.size == 0:
            raise DataError(
                f"--class_order: class {c} ({raw.class_names[c]!r}) has no test images in "
                f"{raw.name}"
            )
        train_idx[c], val_idx[c], test_idx[c] = train, np.sort(idx[:n_val]), test

    def gather(
        per_class: dict[int, np.ndarray], classes: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Source indices and int32 model labels of ``classes``, class by class."""
        indices = np.concatenate([per_class[c] for c in classes])
        labels = np.concatenate(
            [np.full(per_class[c].size, label_of[c], dtype=np.int32) for c in classes]
        )
        return indices, labels

    tasks, digests = [], []
    for t in range(n_tasks):
        classes = tuple(order[t * cpt : (t + 1) * cpt])
        tr_i, tr_y = gather(train_idx, classes)
        perm = np.random.default_rng((seed, _TASK_SHUFFLE_STREAM, t)).permutation(tr_i.size)
        tr_i, tr_y = tr_i[perm], tr_y[perm]
        va_i, va_y = gather(val_idx, classes)
        te_i, te_y = gather(test_idx, classes)
        x_tr, x_va, x_te = raw.x_train[tr_i], raw.x_train[va_i], raw.x_test[te_i]
        digests.append(
            {
                "train": _split_digest(x_tr, tr_y),
                "val": _split_digest(x_va, va_y),
                "test": _split_digest(x_te, te_y),
            }
        )
        tasks.append(
            TaskData(
                index=t,
                classes=classes,
                labels=tuple(label_of[c] for c in classes),
                x_train=to_model_images(x_tr, size),
                y_train=tr_y,
                x_val=to_model_images(x_va, size),
                y_val=va_y,
                x_test=to_model_images(x_te, size),
                y_test=te_y,
            )
        )
        del x_tr, x_va, x_te
    return Scenario(
        dataset=raw.name,
        class_order=tuple(order),
        class_names=tuple(raw.class_names[c] for c in order),
        classes_per_task=cpt,
        tasks=tuple(tasks),
        image_shape=(size, size, int(raw.x_train.shape[-1])),
        source_image_shape=raw.image_shape,
        split_digests=tuple(digests),
    )
