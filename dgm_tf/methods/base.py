"""The interface every continual-learning method offers the engine."""

from __future__ import annotations

import abc
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from dgm_tf.config import Config
from dgm_tf.data import Scenario, TaskData
from dgm_tf.fit_loop import fit_epochs  # noqa: F401 (the trainers' loop; re-exported for the methods)


class ContinualMethod(abc.ABC):
    """A method is driven task by task by ``dgm_tf.engine.run_experiment``.

    For every task the engine calls ``begin_task``, ``train_task`` (which fits on the
    task's real data, with whatever memory the method keeps), puts back the best
    validation epoch's classifier (``set_classifier_weights``, unless
    ``--norestore_best``), then evaluates ``classifier_logits`` on every seen task, then
    calls ``end_task``.
    """

    name: str = "method"
    # True when begin_task always builds new network objects (a grown head, a grown
    # generator, a fresh critic) and never changes the previous task's: the engine may
    # then write task t's export while task t+1 trains (dgm_tf/engine/writer.py).
    # Pinned per method by tests/test_background_export.py.
    fresh_networks_each_task: bool = False

    def __init__(self, config: Config, scenario: Scenario):
        self.config = config
        self.scenario = scenario

    @abc.abstractmethod
    def begin_task(self, task: TaskData) -> None:
        """Prepare networks, optimizers and memory for ``task``."""

    @abc.abstractmethod
    def train_task(self, task: TaskData, callbacks: Sequence[keras.callbacks.Callback]) -> None:
        """Train on ``task`` for ``config.epochs`` epochs; callbacks see every epoch."""

    @abc.abstractmethod
    def end_task(self, task: TaskData) -> None:
        """Consolidate what ``task`` learned (masks, importance, growth, ...)."""

    @abc.abstractmethod
    def classifier_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits over every class seen so far (inference mode), images in [-1, 1]."""

    @abc.abstractmethod
    def classifier_for_export(self) -> tuple[object, Callable]:
        """``(network, logits_fn)`` for the SavedModel export: ``network`` holds every
        variable the classifier uses (it is saved), ``logits_fn`` maps float32 images
        [N, 32, 32, C] in [-1, 1] to logits over every class seen so far (inference)."""

    @abc.abstractmethod
    def classifier_weights(self) -> list[np.ndarray]:
        """Copies of every variable ``classifier_logits`` depends on, in a fixed order:
        trainable weights and the state that goes with them (BatchNorm moving
        statistics). The engine keeps the best validation epoch's
        (``engine.ValidationSelection``, also in epoch checkpoints) and puts them back
        with ``set_classifier_weights`` at the end of the task (``--restore_best``)."""

    @abc.abstractmethod
    def set_classifier_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Assign ``classifier_weights()``'s output back to the classifier in place (the
        method's traced functions keep using the same variables): what it predicts,
        exports, checkpoints and, for methods whose classifier carries over, starts the
        next task from, is then that epoch's classifier."""

    def generator_for_export(self) -> tuple[object, float] | None:
        """``(generator, s)`` for the generative-memory export, or None."""
        return None

    def sample(self, labels: np.ndarray, seed: int) -> np.ndarray | None:
        """Generated images of ``labels`` in [-1, 1], or None for non-generative methods."""
        return None

    def checkpoint_state(self, during_task: bool = True) -> tuple[dict, dict[str, np.ndarray], dict]:
        """``(json_state, arrays, shared_arrays)`` from which ``restore_checkpoint``
        rebuilds the method exactly; ``during_task``: taken between epochs of a task
        (include optimizer state, RNG, replay), else after ``end_task``.

        The engine writes them on another thread while training goes on
        (dgm_tf/engine/writer.py): return copies (``Variable.numpy()``) or arrays the
        method replaces rather than changes in place afterwards."""
        raise NotImplementedError(f"{self.name} does not support checkpoints")

    def restore_checkpoint(self, state: dict, arrays: dict, shared: dict, task: TaskData | None) -> None:
        """Inverse of ``checkpoint_state``; ``task`` is the task in progress or None."""
        raise NotImplementedError(f"{self.name} does not support checkpoints")

    def mask_values(self) -> dict[str, np.ndarray]:
        """Monitoring: the current task's mask values per masked layer, at the current
        mask scale (empty for methods without masks)."""
        return {}

    def capacity(self) -> dict[str, dict[str, float]]:
        """Monitoring, after ``end_task``: per masked layer, the fractions of its weights
        ``reserved`` (by all tasks so far), ``free`` and ``task_used`` (by the last task)."""
        return {}

    def replay_examples(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Monitoring: up to ``n`` images (and labels) the classifier is replaying now."""
        return None

    def task_summary(self) -> dict:
        """Per-task numbers for results.json (e.g. ``generator_params``)."""
        return {}

    def max_task_epochs(self, task: TaskData) -> int | None:
        """A method that decides a task's length itself (NISPA's phases): the most
        epochs ``train_task`` may run for ``task``. None (the default): exactly
        ``--epochs``, as ``train_task`` is told."""
        return None

    def task_epochs_run(self) -> tuple[int, int | None] | None:
        """After ``train_task`` of a method with ``max_task_epochs``: (epochs it ran,
        the 0-based epoch whose classifier it left in place, or None when that is the
        last and ``--restore_best`` may select another). None (the default): ``--epochs``."""
        return None


class TrackedTrainer(keras.Model):
    """What the comparison methods' per-task trainers share: a ``keras.metrics.Mean`` per
    logged name (``trackers``, reset by the loop every epoch) and an optimizer whose
    slots are built, outside any trace, for ``trained_variables`` only.

    Args:
        name: The trainer's name.
        trained_variables: The variables ``train_step`` updates.
        log_names: The names of the running means it logs.
    """

    def __init__(self, name: str, trained_variables: Sequence[tf.Variable], log_names: Sequence[str]):
        super().__init__(name=name)
        self.trained_variables = list(trained_variables)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in log_names}
        self.built = True

    @property
    def metrics(self):
        return list(self.trackers.values())

    def compile(self, optimizer):
        super().compile(optimizer=optimizer, jit_compile=False)
        self.optimizer.build(self.trained_variables)


def store_variables(arrays: dict, prefix: str, variables: Sequence) -> None:
    """Put each variable's value into ``arrays`` as ``<prefix>/<index:04d>`` (checkpoints)."""
    for i, v in enumerate(variables):
        arrays[f"{prefix}/{i:04d}"] = v.numpy()


def load_variables(variables: Sequence, arrays: dict, prefix: str, what: str) -> None:
    """``store_variables``'s inverse: assigns every variable, refusing a checkpoint that
    holds another number of them (``what`` names them in the error)."""
    variables = list(variables)
    n = len(variables)
    if f"{prefix}/{n:04d}" in arrays or (n and f"{prefix}/{n - 1:04d}" not in arrays):
        raise ValueError(f"checkpoint's {what} do not match the rebuilt network")
    for i, v in enumerate(variables):
        v.assign(arrays[f"{prefix}/{i:04d}"])


def copy_weights(model: keras.Model) -> list[np.ndarray]:
    """Copies of all of ``model``'s variables, trainable and not (``model.weights``
    order, the order of ``get_weights``)."""
    return [np.array(v.numpy(), copy=True) for v in model.weights]


def assign_weights(model: keras.Model, values: Sequence[np.ndarray]) -> None:
    """``copy_weights``'s inverse: assigns in place, refusing a different count or shape."""
    variables = model.weights
    if len(values) != len(variables):
        raise ValueError(f"{model.name}: {len(values)} arrays for {len(variables)} variables")
    for v, value in zip(variables, values):
        if tuple(np.shape(value)) != tuple(v.shape):
            raise ValueError(f"{model.name}: array of shape {np.shape(value)} for {v.path} {tuple(v.shape)}")
    for v, value in zip(variables, values):
        v.assign(value)


def images_function(fn: Callable, image_shape: Sequence[int]) -> Callable:
    """``fn`` as a ``tf.function`` of one float32 batch of ``image_shape`` images, of
    any size, traced once. The evaluation passes call a method's inference function
    with batches of several sizes (``EVAL_BATCH`` rows and each split's remainder: 500
    and 400 for 900 validation images), and a function without a signature traces once
    per size before ``reduce_retracing`` relaxes it: two traces per task, each a
    noticeable part of a second (README, Performance; tests/test_evaluation_trace.py)."""
    return tf.function(fn, input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])


# Batches read ahead of the training step. Two hide the (millisecond) batch assembly
# behind a step of 25+ ms; more only holds memory.
_PREFETCH_BATCHES = 2


def epoch_pipeline(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` prefetched, with tf.data's autotuning off.

    Every epoch reads a fresh dataset (its order is keyed by epoch, see ``fit_epochs``),
    so each epoch creates and destroys an iterator. With autotuning on, destroying it
    waits for the autotuner's background thread: measured on the 2-core CPU of the
    README (DGMw, task 4, 16 steps of 255 ms), 2 to 4 of every 8 epochs stalled for
    0.94-1.15 s at their end, with or without prefetching, and none did with autotuning
    off. A fixed buffer needs no tuning.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(_PREFETCH_BATCHES).with_options(options)
