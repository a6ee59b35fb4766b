"""What the comparison methods (fine-tune, joint, MAS) share: one classifier, class-
incrementally with a single head, a fresh Adam and trainer per task.

The head has a logit per class seen so far and the loss is the cross-entropy over all
of them. Per task: Adam(lr_d, beta1, beta2, epsilon 1e-8), made fresh (as DGM's
classifier), batch ``batch_size``, ``epochs`` epochs. The methods differ only in the
data of an epoch (``memory``), the loss (``penalty_fn``) and what ``end_task``
consolidates; each lives in its own file (``finetune.py``, ``joint.py``, ``mas.py``).

The classifier (``--classifier``, ``dgm_tf.models.classifier``): ``dgm`` is DGM's own
``Discriminator`` — its auxiliary class head is the classifier, its trunk the same
network at the same ``ndf`` — so the numbers compare with DGM's classifier. The critic
head stays in the model (one linear unit, built and grown with it) but is neither
trained, nor part of MAS's parameters, nor used by the logits; reusing the class whole
keeps one definition of the trunk, its initialisation and its head growth
(``with_classes``) instead of a copy that could drift. ``cnn`` is the larger
``CNNClassifier``.

Keras 3 locks built layers, so a grown head is a new network (``with_classes``: trunk
and old class rows copied) and the per-task trainer is made anew after growth (a
trainer traced before growth would keep training the old variables).
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from dgm_tf.config import Config
from dgm_tf.data import Scenario, TaskData
from dgm_tf.loss_scaling import agree_on_overflow, maybe_loss_scaled, scaled_loss
from dgm_tf.methods.base import (
    ContinualMethod,
    TrackedTrainer,
    assign_weights,
    copy_weights,
    epoch_pipeline,
    fit_epochs,
    images_function,
    load_variables,
    store_variables,
)
from dgm_tf.methods.dgm import task_seed
from dgm_tf.models.classifier import build_classifier, classifier_variables, network_logits
from dgm_tf.replica import batch_free, global_count, global_mean, local_share, replica_sum, update_weighted_mean

_DATA_STREAM = 13  # keys the comparison methods' per-epoch data order apart from other seeded streams


class ClassifierTaskTrainer(TrackedTrainer):
    """One cross-entropy step (plus an optional penalty) per batch, for one task.

    Inputs per step: ``{"x", "y", "is_replay"}``; ``is_replay`` (1.0 for a stored
    sample of an earlier task) only splits the reported loss and accuracy.

    Args:
        network: The classifier (its variables are trained).
        task: Task index (names the trainer).
        penalty: ``() -> scalar`` added to the cross-entropy (MAS), or None.
        penalty_name: Log key of the penalty.
        split_replay: Report ``c_loss_real``/``c_loss_replay`` (and accuracies).
    """

    def __init__(self, network: keras.Model, *, task: int, penalty: Callable[[], tf.Tensor] | None = None,
                 penalty_name: str = "penalty", split_replay: bool = False):
        names = ["loss", "c_loss", "c_acc"]
        if penalty is not None:
            names.append(penalty_name)
        if split_replay:
            names += ["c_loss_real", "c_acc_real", "c_loss_replay", "c_acc_replay"]
        # The optimizer's slots cover the classifier's variables only.
        super().__init__(f"classifier_task_{task}", classifier_variables(network), names)
        self.network = network
        self.task = int(task)
        self.penalty = penalty
        self.penalty_name = penalty_name
        self.split_replay = bool(split_replay)

    def train_step(self, data):
        # The loop hands every replica the global batch; this replica trains on its rows.
        x, y, is_replay = local_share((data["x"], data["y"], data["is_replay"]))
        # Written as this replica's share (dgm_tf.replica): on N replicas the summed
        # gradients are one device's; on one device these are the plain means.
        n = global_count(y)
        with tf.GradientTape() as tape:
            logits = network_logits(self.network, x, training=True)
            per_sample = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            c_share = global_mean(per_sample, n)
            penalty = self.penalty() if self.penalty is not None else tf.constant(0.0)
            loss = c_share + batch_free(penalty)
            target = scaled_loss(self.optimizer, loss)  # mixed_float16 (dgm_tf.loss_scaling)
        grads = tape.gradient(target, self.trained_variables)
        grads = agree_on_overflow(self.optimizer, grads)
        self.optimizer.apply_gradients(zip(grads, self.trained_variables))
        hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32)
        c_loss, c_acc = replica_sum((c_share, global_mean(hits, n)))  # the global batch's
        step = {"loss": c_loss + penalty, "c_loss": c_loss, "c_acc": c_acc}
        if self.penalty is not None:
            step[self.penalty_name] = penalty
        for name, value in step.items():
            self.trackers[name].update_state(value)
        if self.split_replay:
            real = 1.0 - is_replay
            update_weighted_mean(self.trackers["c_loss_real"], per_sample, real)
            update_weighted_mean(self.trackers["c_acc_real"], hits, real)
            update_weighted_mean(self.trackers["c_loss_replay"], per_sample, is_replay)
            update_weighted_mean(self.trackers["c_acc_replay"], hits, is_replay)
        logs = {name: t.result() for name, t in self.trackers.items()}
        # This iteration's own values; the trackers hold the epoch's running means.
        logs.update({f"{name}_step": tf.identity(value) for name, value in step.items()})
        return logs


class ClassifierBaseline(ContinualMethod):
    """Hooks shared by the comparison methods; subclasses choose the epoch's data
    (``memory``), the penalty (``penalty_fn``) and what ``end_task`` consolidates."""

    name = "baseline"
    fresh_networks_each_task = True  # the head grows into a new network (with_classes)

    def __init__(self, config: Config, scenario: Scenario):
        super().__init__(config, scenario)
        self.image_channels = scenario.image_shape[-1]
        self.image_size = scenario.image_shape[0]
        self.network: keras.Model | None = None
        self.trainer: ClassifierTaskTrainer | None = None
        self.history: list[dict] = []
        self._seen_labels: list[int] = []
        self._classify = None
        self._epoch_arrays = None  # (task index, (x, y, is_replay)) of the task being trained

    # -- what subclasses change ---------------------------------------------------------

    def memory(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Earlier tasks' (images, labels) trained on together with the current task."""
        return []

    def penalty_fn(self) -> Callable[[], tf.Tensor] | None:
        """The regulariser added to the cross-entropy for the current trainer, or None."""
        return None

    def head_grown(self) -> None:
        """Called in ``begin_task`` after the class head grew (new network)."""

    def consolidate(self, task: TaskData) -> dict:
        """``end_task``'s method-specific work; returns numbers for ``task_summary``."""
        return {}

    def extra_state(self, during_task: bool) -> tuple[dict, dict, dict]:
        return {}, {}, {}

    def restore_extra(self, state: dict, arrays: dict, shared: dict) -> None:
        pass

    # -- hooks ---------------------------------------------------------------------------

    def begin_task(self, task: TaskData) -> None:
        cfg = self.config
        # The head's new rows (and a first network) are drawn from Keras's global RNG:
        # reseeded per task so a run resumed at a task boundary builds the same ones.
        keras.utils.set_random_seed(task_seed(cfg.seed, task.index))
        self._seen_labels += list(task.labels)
        num_seen = len(self._seen_labels)
        if max(task.labels) >= num_seen:
            raise ValueError(
                f"task {task.index} has labels {list(task.labels)}; a single head over {num_seen} seen "
                "classes needs the model labels 0..seen-1 in task order"
            )
        if self.network is None:
            self.network = build_classifier(
                cfg.classifier, cfg.ndf, num_seen, self.image_channels, self.image_size, cfg.precision
            )
        else:
            self.network = self.network.with_classes(num_seen)
        self.head_grown()
        self._make_trainer(task)

    def _make_trainer(self, task: TaskData) -> None:
        cfg = self.config
        penalty = self.penalty_fn()
        self.trainer = ClassifierTaskTrainer(
            self.network, task=task.index, penalty=penalty, penalty_name=f"{self.name}_penalty",
            split_replay=bool(self.memory()),
        )
        # PyTorch's Adam epsilon (1e-8), as DGM's classifier uses; fresh per task.
        self.trainer.compile(maybe_loss_scaled(
            keras.optimizers.Adam(cfg.lr_d, beta_1=cfg.beta1, beta_2=cfg.beta2, epsilon=1e-8), cfg.precision
        ))
        self._epoch_arrays = None
        self._set_classifier()

    def _set_classifier(self) -> None:
        network = self.network
        self._classify = images_function(lambda x: network_logits(network, x, training=False),
                                         self.scenario.image_shape)

    def epoch_arrays(self, task: TaskData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (images, labels, is_replay) of one epoch of ``task``: the task's training
        data, then the memory's (flag 1.0)."""
        if self._epoch_arrays is None or self._epoch_arrays[0] != task.index:
            parts = [(task.x_train, task.y_train.astype(np.int32), np.zeros(len(task.y_train), np.float32))]
            for x, y in self.memory():
                parts.append((x, y.astype(np.int32), np.ones(len(y), np.float32)))
            self._epoch_arrays = (task.index, tuple(np.concatenate(p) for p in zip(*parts)))
        return self._epoch_arrays[1]

    def train_dataset(self, task: TaskData, epoch: int) -> tf.data.Dataset:
        """Epoch ``epoch``'s batches, in an order that is a pure function of (seed,
        task, epoch): a run resumed at epoch e reads exactly the batches the
        uninterrupted run read."""
        x, y, r = self.epoch_arrays(task)
        order = np.random.default_rng((self.config.seed, _DATA_STREAM, task.index, epoch)).permutation(len(y))
        return epoch_pipeline(
            tf.data.Dataset.from_tensor_slices({"x": x[order], "y": y[order], "is_replay": r[order]})
            .batch(self.config.batch_size)
        )

    def train_task(self, task: TaskData, callbacks: Sequence[keras.callbacks.Callback], initial_epoch: int = 0) -> None:
        """Epochs ``initial_epoch`` .. epochs-1, one ``fit`` call per epoch (each on that
        epoch's dataset; the traced step is reused)."""
        fit_epochs(self.trainer, lambda epoch: self.train_dataset(task, epoch), initial_epoch, self.config.epochs,
                   callbacks)

    def end_task(self, task: TaskData) -> None:
        summary = {
            "classifier": self.config.classifier,
            "classifier_params": int(sum(int(np.prod(v.shape)) for v in classifier_variables(self.network))),
            "num_classes": len(self._seen_labels),
        }
        summary.update(self.consolidate(task))
        self.history.append(summary)
        self._epoch_arrays = None

    # -- checkpoints ------------------------------------------------------------------

    def checkpoint_state(self, during_task: bool = True):
        """(JSON state, arrays, shared arrays): the network (weights and BN statistics),
        during a task the optimizer's slots and step, and the subclass's state."""
        state = {
            "classifier": self.config.classifier,
            "num_seen": len(self._seen_labels),
            "seen_labels": list(self._seen_labels),
            "history": self.history,
            "trainer_task": None if self.trainer is None or not during_task else self.trainer.task,
        }
        arrays = {}
        if self.network is not None:
            store_variables(arrays, "classifier", self.network.weights)
        if self.trainer is not None and during_task:
            store_variables(arrays, "optimizer", self.trainer.optimizer.variables)
        extra_state, extra_arrays, shared = self.extra_state(during_task)
        state.update(extra_state)
        arrays.update(extra_arrays)
        return state, arrays, shared

    def restore_checkpoint(self, state, arrays, shared, task: TaskData | None) -> None:
        """Rebuild from ``checkpoint_state``'s output. ``task``: the task being trained
        when the checkpoint was taken (mid-task), or None (taken after ``end_task``)."""
        if state["classifier"] != self.config.classifier:
            raise ValueError(f"checkpoint has --classifier={state['classifier']}, not {self.config.classifier}")
        self._seen_labels = list(state["seen_labels"])
        self.history = list(state["history"])
        self.network = build_classifier(
            self.config.classifier, self.config.ndf, state["num_seen"], self.image_channels, self.image_size,
            self.config.precision,
        )
        load_variables(self.network.weights, arrays, "classifier", "classifier weights")
        self.restore_extra(state, arrays, shared)
        self.trainer = None
        self._epoch_arrays = None
        if task is not None:
            if state.get("trainer_task") != task.index:
                raise ValueError(f"checkpoint was taken during task {state.get('trainer_task')}, not {task.index}")
            self._make_trainer(task)
            load_variables(self.trainer.optimizer.variables, arrays, "optimizer", "optimizer slots")
        self._set_classifier()

    # -- inference and export ------------------------------------------------------------

    def classifier_logits(self, images: np.ndarray) -> np.ndarray:
        return self._classify(tf.convert_to_tensor(images, tf.float32)).numpy()

    def classifier_for_export(self):
        network = self.network
        return network, lambda images: network_logits(network, images, training=False)

    def classifier_weights(self) -> list[np.ndarray]:
        """The network's weights and BN statistics (with ``--classifier=dgm`` also the
        untrained critic head, which the logits do not read)."""
        return copy_weights(self.network)

    def set_classifier_weights(self, weights) -> None:
        # The next task's network grows from these (``with_classes``) and MAS's
        # ``consolidate`` (end_task) takes theta* and the importance at them.
        assign_weights(self.network, weights)

    def task_summary(self) -> dict:
        return dict(self.history[-1]) if self.history else {}
