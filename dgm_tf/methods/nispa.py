"""NISPA on the engine: sparse networks at a fixed density, trained in phases.

NISPA (Gurbuz & Dovrolis, "NISPA: Neuro-Inspired Stability-Plasticity Adaptation for
Continual Learning in Sparse Networks", ICML 2022, arXiv 2206.09117; reference code
github BurakGurbuz97/NISPA). The pure pieces (masks, p schedule, stable units,
drop/regrow, stop rule, freeze, re-initialisation, head mask) are in
``dgm_tf.methods.nispa_core``, the masked layers in ``dgm_tf.layers.sparse_masked`` and
the networks in ``dgm_tf.models.nispa_nets``; this file drives them task by task.

Per task (NISPA/NISPA/learner.py, ``Learner.task_train``):

1. Phases of ``--nispa_phase_epochs`` epochs (reference 5). Adam (PyTorch's defaults:
   betas 0.9/0.999, epsilon 1e-8; ``--nispa_lr``, by default 0.01 for the MLP and 0.002
   for the ConvNet) starts afresh every phase: its slots and step counter are put back
   to their initial values, which is a new Adam without retracing the step.
2. After every epoch the method validates on the task's validation data (task heads:
   the argmax among the task's classes; single head: over all classes), in percent.
   A phase keeps its first best epoch (``training_CL``); with the single head its last
   epoch (NISPA_Replay's ``training_CL_memory``).
3. After phase k: stop if ``nispa_core.should_stop`` (accuracy more than ``--nispa_a_f``
   points below the best earlier phase, after ``--nispa_min_phases`` phases, or p(k) <=
   5 %); then revert to the previous phase's kept weights, masks and stable set.
   Otherwise: mean post-ReLU activations over the task's training data, stable units at
   p(k) (united with earlier tasks'), drop plastic->stable connections, regrow
   (``nispa_core.rewire``), next phase.
4. Task end (``end_task``): freeze stable->stable connections and stable biases, then
   re-initialise every other weight (masks kept).

Heads: ``--nispa_heads=task`` (default; the paper's task-incremental NISPA) multiplies
the logits by the 0/1 mask of the task's classes in training; at test the engine's
task-aware accuracy is the argmax among the task's classes (the reference's argmax of
the masked logits can pick a zeroed class when every task logit is negative; ours
cannot). ``single`` is NISPA_Replay: one head over every class, cross-entropy over all
outputs, with ``--replay_buffer=N`` stored training images (1000 on MNIST/CIFAR-10 in
its scripts) split evenly over the classes seen (continuum's random herding), and each
batch's loss CE(real) + 5 CE(stored batch of the same size) (its ``--replay_lambda 5``).
As NISPA_Replay does, the single head's output layer is never frozen
(``reset_frozen_gradients`` skips the last module) and nothing is re-initialised (its
``--reinit`` defaults to 0 and its scripts do not set it).

The engine contract (``dgm_tf.engine.callbacks.epoch_budget``): ``max_task_epochs``
tells the engine the most epochs a task may run (phase epochs times the phase at which
p <= 5 %), epochs are numbered 0, 1, ... across the phases (``fit_epochs`` per phase with
the running index), and ``task_epochs_run`` reports the epochs run and the epoch whose
classifier the revert kept: that is the task's selection, so ``--restore_best`` has no
effect (``ValidationSelection`` still runs for results.json's best-validation row).

Exact resume: every random draw is ``numpy.random.default_rng((seed, stream, task,
phase or epoch))``, so nothing random needs saving; a checkpoint after any epoch holds
the phase, the epochs done in it, its validation accuracies and kept epoch (with its
weights), the previous phase's weights, masks and stable set, the stable sets, the
optimizer's slots and the buffer. A checkpoint taken after a phase's last epoch is
taken before the phase's end (the callbacks run inside the phase), so a resumed task
does that phase end first: the same stop decision and rewiring.

Networks (``--nispa_network=auto``): the MLP for one-channel images, the ConvNet for
three. Images are the engine's 32x32 in [-1, 1], so the MLP reads 1024 inputs where the
reference's reads 28x28 = 784. Output units: every class of the scenario from the
start (the reference's ``output_dim``); the engine's logits are the seen classes'. In
the last task every output unit is stable, so the dropped plastic->logit connections
find no place to regrow and the logit layer ends that task below its density (the
reference loses them too: ``grow_connection_A2B`` returns them as remainder); every
other layer keeps its count exactly.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dgm_tf import metrics
from dgm_tf.config import Config, ConfigError
from dgm_tf.data import Scenario, TaskData
from dgm_tf.layers.sparse_masked import mask_frozen_gradients
from dgm_tf.methods import nispa_core as core
from dgm_tf.methods.base import ContinualMethod, TrackedTrainer, epoch_pipeline, fit_epochs, images_function
from dgm_tf.models import nispa_nets  # a module: nispa_nets imports nispa_core through this package
from dgm_tf.replica import global_count, global_mean, local_share, replica_sum

# Streams of numpy.random.default_rng((seed, stream, ...)), apart from other methods'.
_INIT, _DATA, _MEMORY, _REWIRE, _REINIT, _BUFFER = 31, 32, 33, 34, 35, 36
# The reference's learning rates (NISPA/EFMNIST_experiment.sh, CIFAR10_experiment.sh).
REFERENCE_LR = {"mlp": 0.01, "conv": 0.002}
# Weight of the stored batch's cross-entropy (NISPA_Replay/MNIST.sh, CIFAR10.sh: --replay_lambda 5).
REPLAY_LAMBDA = 5.0
_EVAL_BATCH = 500


def network_kind(config: Config, image_shape: Sequence[int]) -> str:
    """``mlp`` or ``conv``: ``--nispa_network``, or with ``auto`` by the image channels
    (one: the MLP of the reference's MNIST-like runs; three: its CIFAR ConvNet)."""
    if config.nispa_network != "auto":
        return config.nispa_network
    return "mlp" if int(image_shape[-1]) == 1 else "conv"


def max_phases(k: float, p_min: float = core.P_MIN) -> int:
    """The phase at which p <= ``p_min`` stops a task at the latest (26 for k = 30)."""
    phase = 1
    while core.p_schedule(phase, k) > p_min:
        phase += 1
        if phase > 4 * k + 4:  # p returns to 0 at phase k; unreachable for k >= 3 (config)
            raise ValueError(f"p never falls to {p_min} for k = {k}")
    return phase


class NispaTaskTrainer(TrackedTrainer):
    """One cross-entropy step per batch of the NISPA network, frozen gradients zeroed.

    Inputs per step: ``{"x", "y"}`` and, with a replay buffer, ``{"mx", "my"}`` (a stored
    batch of the same size). Losses are this replica's shares (``dgm_tf.replica``), so
    on N replicas the summed gradients are one device's.

    Args:
        network: A NISPA network (``models.nispa_nets``); its kernels and biases train.
        num_classes: Output units.
        task_heads: Multiply the logits by ``head_mask`` (the task's classes).
        replay_lambda: Weight of the stored batch's cross-entropy.
    """

    def __init__(self, network: keras.Model, num_classes: int, *, task_heads: bool, replay_lambda: float):
        super().__init__("nispa_trainer", [v for layer in network.sparse_layers for v in (layer.kernel, layer.bias)],
                         ("loss", "c_loss", "c_acc", "c_loss_replay", "c_acc_replay"))
        self.network = network
        self.task_heads = bool(task_heads)
        self.replay_lambda = float(replay_lambda)
        self.head_mask = keras.Variable(np.ones(num_classes, np.float32), trainable=False, name="head_mask")

    def _logits(self, x):
        logits = self.network(x, training=True)
        # The task's head: the other classes' logits are 0 (nispa_core.apply_head_mask).
        return core.apply_head_mask(logits, self.head_mask) if self.task_heads else logits

    def _hits(self, logits, y):
        if self.task_heads:  # the argmax among the task's classes
            logits = tf.where(self.head_mask[None, :] > 0, logits, tf.constant(-np.inf, logits.dtype))
        return tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32)

    def train_step(self, data):
        data = local_share(data)  # this replica's rows of the global batch
        x, y = data["x"], data["y"]
        replay = "mx" in data
        n = global_count(y)
        with tf.GradientTape() as tape:
            logits = self._logits(x)
            c_share = global_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True), n)
            loss = c_share
            if replay:
                m_logits = self._logits(data["mx"])
                m_count = global_count(data["my"])
                m_share = global_mean(
                    keras.losses.sparse_categorical_crossentropy(data["my"], m_logits, from_logits=True), m_count
                )
                loss = c_share + self.replay_lambda * m_share
        grads = tape.gradient(loss, self.trained_variables)
        # Frozen stable->stable connections and stable biases get exactly 0
        # (NISPA/NISPA/training.py, reset_frozen_gradients).
        grads = mask_frozen_gradients(grads, self.trained_variables, self.network.sparse_layers)
        self.optimizer.apply_gradients(zip(grads, self.trained_variables))
        c_loss, c_acc = replica_sum((c_share, global_mean(self._hits(logits, y), n)))
        step = {"loss": c_loss, "c_loss": c_loss, "c_acc": c_acc}
        if replay:
            m_loss, m_acc = replica_sum((m_share, global_mean(self._hits(m_logits, data["my"]), m_count)))
            step.update(loss=c_loss + self.replay_lambda * m_loss, c_loss_replay=m_loss, c_acc_replay=m_acc)
        for name, value in step.items():
            self.trackers[name].update_state(value)
        logs = {name: self.trackers[name].result() for name in step}
        logs.update({f"{name}_step": tf.identity(value) for name, value in step.items() if "acc" not in name})
        return logs


class NispaPhaseCallback(keras.callbacks.Callback):
    """First of a task's callbacks: the method's own validation after every epoch (the
    phase's kept epoch), before the engine's callbacks (so the epoch checkpoint holds it)."""

    def __init__(self, method: "NISPA", task: TaskData):
        super().__init__()
        self.method, self.task = method, task
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.method._after_epoch(self.task, epoch, logs)


class _PhaseState:
    """Where a task's phase loop is. Weights are ``NISPA.classifier_weights()`` lists;
    stable sets lists of boolean arrays, one per unit layer (``nispa_core``)."""

    def __init__(self, task: int, stable):
        self.task = task
        self.phase = 1  # the phase being trained (or just trained: epoch_in_phase == epochs)
        self.epoch_in_phase = 0
        self.phase_val: list[float] = []  # validation accuracy (%) of this phase's epochs
        self.phase_best_epoch: int | None = None  # (task-wide) epoch the phase keeps
        self.phase_best: list | None = None  # its weights (task heads; single head: the last, in place)
        self.best_pct = 0.0  # best kept accuracy of the earlier phases (the reference's acc_prev)
        self.stable = stable  # the stable sets this phase trains under
        self.prev_weights: list | None = None  # the previous phase's kept classifier
        self.prev_stable = None
        self.prev_epoch: int | None = None
        self.phase_accuracies: list[float] = []  # each finished phase's kept accuracy (%)
        self.rewires: list[dict] = []
        self.stopped: int | None = None  # the phase after which the loop stopped

    _SCALARS = ("task", "phase", "epoch_in_phase", "phase_val", "phase_best_epoch", "best_pct", "prev_epoch",
                "phase_accuracies", "rewires", "stopped")

    def state(self) -> dict:
        out = {name: getattr(self, name) for name in self._SCALARS}
        out.update(has_phase_best=self.phase_best is not None, has_prev=self.prev_weights is not None,
                   has_stable=self.stable is not None, has_prev_stable=self.prev_stable is not None)
        return out

    @classmethod
    def from_state(cls, state: dict) -> "_PhaseState":
        st = cls(state["task"], None)
        for name in cls._SCALARS:
            setattr(st, name, state[name])
        return st


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class NISPA(ContinualMethod):
    """NISPA (arXiv 2206.09117) with task heads or, with ``--nispa_heads=single``, the
    class-incremental NISPA_Replay; the module docstring maps the reference to code."""

    name = "nispa"

    def __init__(self, config: Config, scenario: Scenario):
        super().__init__(config, scenario)
        self.kind = network_kind(config, scenario.image_shape)
        self.task_heads = config.nispa_heads == "task"
        self.num_classes = scenario.num_classes
        self.phase_epochs = config.nispa_phase_epochs
        self.lr = config.nispa_lr or REFERENCE_LR[self.kind]
        if config.replay_buffer and config.replay_buffer < self.num_classes:
            raise ConfigError(
                f"--replay_buffer: {config.replay_buffer} images cannot hold one of each of the "
                f"{self.num_classes} classes"
            )
        width = config.nispa_hidden or None  # None: the reference's
        self.network = nispa_nets.build_nispa_network(
            self.kind, self.num_classes, scenario.image_shape, density=config.nispa_density or None,
            seed=(config.seed, _INIT), mlp_hidden=None if width is None else (width,) * 3, dense_units=width,
        )
        self.sources = self.network.sources()
        self.trainer: NispaTaskTrainer | None = None
        self._optimizer_initial: list[np.ndarray] | None = None
        self.seen_labels: list[int] = []
        self.task_stable: list[np.ndarray] | None = None  # stable units after the last finished task
        self.buffer: tuple[np.ndarray, np.ndarray] | None = None
        self.buffer_key: str | None = None
        self.history: list[dict] = []
        self._st: _PhaseState | None = None
        network = self.network
        self._logits_fn = images_function(lambda x: network(x, training=False), self.scenario.image_shape)
        def unit_sums(x):  # per hidden unit layer, activations summed over batch (and space)
            return [tf.reduce_sum(tf.reshape(a, [-1, tf.shape(a)[-1]]), axis=0) for a in network.unit_activations(x)]

        self._unit_sums_fn = tf.function(unit_sums, reduce_retracing=True)

    # -- the engine's epoch contract (dgm_tf.engine.callbacks.epoch_budget) ---------------

    def max_task_epochs(self, task: TaskData) -> int:
        """Most epochs a task runs: until the phase whose p is <= 5 %."""
        return self.phase_epochs * max_phases(self.config.nispa_k)

    def task_epochs_run(self) -> tuple[int, int]:
        """(epochs the task ran, the epoch whose classifier the revert kept)."""
        st = self._st
        if st is None or st.stopped is None:
            raise RuntimeError("task_epochs_run: no task has finished its phases")
        return st.stopped * self.phase_epochs, st.prev_epoch

    # -- hooks ---------------------------------------------------------------------------

    def begin_task(self, task: TaskData) -> None:
        self.seen_labels += list(task.labels)
        if max(task.labels) >= len(self.seen_labels):
            raise ValueError(f"task {task.index} has labels {list(task.labels)}; expected 0..seen-1 in task order")
        self._ensure_trainer()
        self._set_head(task)
        self._st = _PhaseState(task.index, None if self.task_stable is None else [s.copy() for s in self.task_stable])
        self._reset_optimizer()

    def _ensure_trainer(self) -> None:
        if self.trainer is not None:
            return
        self.trainer = NispaTaskTrainer(self.network, self.num_classes, task_heads=self.task_heads,
                                        replay_lambda=REPLAY_LAMBDA)
        # PyTorch's Adam defaults, as the reference's optim.Adam(lr=...).
        self.trainer.compile(keras.optimizers.Adam(self.lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8))
        self._optimizer_initial = [np.array(v.numpy(), copy=True) for v in self.trainer.optimizer.variables]

    def _set_head(self, task: TaskData) -> None:
        mask = core.task_head_mask(self.num_classes, task.labels) if self.task_heads else np.ones(self.num_classes)
        self.trainer.head_mask.assign(mask.astype(np.float32))

    def _reset_optimizer(self) -> None:
        """A new Adam for the phase (NISPA/NISPA/learner.py creates one per phase): step
        counter and slots back to their initial values; the traced step is kept."""
        for v, value in zip(self.trainer.optimizer.variables, self._optimizer_initial):
            v.assign(value)

    def train_task(self, task: TaskData, callbacks: Sequence[keras.callbacks.Callback], initial_epoch: int = 0) -> None:
        """Phases until the stop rule; callbacks see epochs 0, 1, ... across phases."""
        st = self._st
        E = self.phase_epochs
        if initial_epoch != (st.phase - 1) * E + st.epoch_in_phase:
            raise ValueError(
                f"task {task.index}: asked to start at epoch {initial_epoch}, but the method is at epoch "
                f"{st.epoch_in_phase} of phase {st.phase}"
            )
        callbacks = [NispaPhaseCallback(self, task), *callbacks]
        while True:
            if st.epoch_in_phase == E and self._end_phase(task):
                return
            start = (st.phase - 1) * E + st.epoch_in_phase
            fit_epochs(self.trainer, lambda epoch: self._dataset(task, epoch), start, st.phase * E, callbacks)

    def _after_epoch(self, task: TaskData, epoch: int, logs: dict | None) -> None:
        st = self._st
        accuracy = self._validation_pct(task)
        earlier = st.phase_val
        st.phase_val = earlier + [accuracy]
        if self.task_heads and (not earlier or accuracy > max(earlier)):  # nispa_core.phase_best_epoch
            st.phase_best, st.phase_best_epoch = self.classifier_weights(), epoch
        elif not self.task_heads:  # NISPA_Replay keeps the phase's last epoch (the weights in place)
            st.phase_best_epoch = epoch
        st.epoch_in_phase += 1
        if logs is not None:
            logs["phase"] = st.phase
            logs["task_val_acc"] = accuracy / 100.0

    def _end_phase(self, task: TaskData) -> bool:
        """The end of phase ``st.phase``: stop and revert (True), or rewire and start the next."""
        st, cfg = self._st, self.config
        k = st.phase
        if st.phase_best is not None:
            self.set_classifier_weights(st.phase_best)  # the phase's result: its kept epoch
        accuracy = st.phase_val[st.phase_best_epoch - (k - 1) * self.phase_epochs]
        st.phase_accuracies = st.phase_accuracies + [accuracy]
        if core.should_stop(k, accuracy, st.best_pct, a_f=cfg.nispa_a_f, k=cfg.nispa_k,
                            min_phases=cfg.nispa_min_phases):
            if st.prev_weights is None or st.prev_stable is None:  # excluded by nispa_k >= 3, min_phases >= 2
                raise RuntimeError(f"task {task.index}: phase {k} stopped with no earlier phase to keep")
            self.set_classifier_weights(st.prev_weights)
            st.stable, st.stopped = st.prev_stable, k
            st.phase_best = None
            logging.info(
                "task %d: phase %d validates %.2f%% (best %.2f%%, p %.3f): stop, keeping phase %d (epoch %d)",
                task.index + 1, k, accuracy, st.best_pct, core.p_schedule(k, cfg.nispa_k), k - 1, st.prev_epoch + 1,
            )
            return True
        st.best_pct = max(st.best_pct, accuracy)
        st.prev_weights = st.phase_best if st.phase_best is not None else self.classifier_weights()
        st.prev_stable, st.prev_epoch = st.stable, st.phase_best_epoch
        p = core.p_schedule(k, cfg.nispa_k)
        masks = self.network.masks()
        stable = core.select_stable_units(
            self._mean_activations(task.x_train), p, self.task_stable,
            core.class_indicator(self.num_classes, self.seen_labels), masks, self.sources,
        )
        result = core.rewire(self.network.kernels(), masks, stable,
                             np.random.default_rng((cfg.seed, _REWIRE, task.index, k)), self.sources)
        self.network.set_masks(result.masks)
        self.network.set_kernels(result.kernels)
        st.stable = stable
        record = {
            "phase": k, "p": p, "stable_units": [int(s.sum()) for s in stable[1:-1]],
            "dropped": [int(d) for d in result.dropped], "orphan_links": [int(a.sum()) for a in result.orphan_links],
            "regrown": [int(g.sum()) for g in result.regrown], "remainder": [int(r) for r in result.remainder],
        }
        st.rewires = st.rewires + [record]
        logging.info(
            "task %d: phase %d validates %.2f%%; p %.3f, stable units %s, %d connections moved",
            task.index + 1, k, accuracy, p, record["stable_units"], sum(record["dropped"]),
        )
        st.phase, st.epoch_in_phase = k + 1, 0
        st.phase_val, st.phase_best, st.phase_best_epoch = [], None, None
        self._reset_optimizer()
        return False

    def end_task(self, task: TaskData) -> None:
        st, cfg = self._st, self.config
        stable = st.stable
        masks = self.network.masks()
        frozen_before = [layer.frozen_masks()[0] & m for layer, m in zip(self.network.sparse_layers, masks)]
        freeze = core.freeze_masks(stable, masks, self.sources)
        if not self.task_heads:  # NISPA_Replay never freezes the output layer
            freeze[-1] = (np.zeros_like(freeze[-1][0]), np.zeros_like(freeze[-1][1]))
        self.network.set_frozen(freeze)
        if self.task_heads:  # the reference's re_initialize (NISPA/NISPA/learner.py, --reinit 1)
            rng = np.random.default_rng((cfg.seed, _REINIT, task.index))
            kernels, biases = [], []
            for layer, mask, (kernel_frozen, bias_frozen) in zip(self.network.sparse_layers, masks, freeze):
                kernel, bias = core.reinitialize(layer.kernel.numpy(), layer.bias.numpy(), kernel_frozen,
                                                 bias_frozen, mask, rng)
                kernels.append(kernel)
                biases.append(bias)
            self.network.set_kernels(kernels)
            self.network.set_biases(biases)
        self.task_stable = [np.array(s, bool) for s in stable]
        if cfg.replay_buffer:
            self._update_buffer(task)
        connections = core.connection_counts(masks)
        # The rewirings the kept masks went through: after phases 1 .. stopped - 2 (the one
        # after the kept phase was undone by the revert).
        kept = [r for r in st.rewires if r["phase"] <= st.stopped - 2]
        frozen = [int((f[0] & m).sum()) for f, m in zip(freeze, masks)]
        self.history.append({
            "network": self.kind,
            "heads": cfg.nispa_heads,
            "phases": st.stopped,
            "kept_phase": st.stopped - 1,
            "epochs": st.stopped * self.phase_epochs,
            "kept_epoch": st.prev_epoch + 1,
            "phase_validation_accuracy": [round(a, 4) for a in st.phase_accuracies],
            # p of the selection the kept stable set comes from (after phase stopped - 2).
            "stable_p": round(core.p_schedule(st.stopped - 2, cfg.nispa_k), 6),
            "stable_units": [int(s.sum()) for s in stable[1:-1]],
            "connections": connections,
            "density": [c / m.size for c, m in zip(connections, masks)],
            "frozen_connections": frozen,
            "newly_frozen": [f - int(b.sum()) for f, b in zip(frozen, frozen_before)],
            "moved_connections": [sum(r["dropped"][l] for r in kept) for l in range(len(masks))],
            "remainder": [sum(r["remainder"][l] for r in kept) for l in range(len(masks))],
            "buffer": 0 if self.buffer is None else int(len(self.buffer[1])),
        })

    def _update_buffer(self, task: TaskData) -> None:
        """NISPA_Replay's memory after a task (continuum RehearsalMemory, random herding,
        ``fixed_memory=0``): ``replay_buffer // classes seen`` images per class; old classes
        keep their first ones, the task's classes draw theirs at random."""
        per_class = self.config.replay_buffer // len(self.seen_labels)
        xs, ys = [], []
        if self.buffer is not None:
            bx, by = self.buffer
            for label in self.seen_labels[: -len(task.labels)]:
                where = np.flatnonzero(by == label)[:per_class]
                xs.append(bx[where])
                ys.append(by[where])
        rng = np.random.default_rng((self.config.seed, _BUFFER, task.index))
        for label in task.labels:
            where = rng.permutation(np.flatnonzero(task.y_train == label))[:per_class]
            xs.append(np.asarray(task.x_train[where], np.float32))
            ys.append(np.asarray(task.y_train[where], np.int32))
        x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int32)
        self.buffer = (x, y)
        self.buffer_key = f"nispa_buffer_task_{task.index:03d}_{_digest(x, y)}"

    # -- data and measurements -------------------------------------------------------------

    def _dataset(self, task: TaskData, epoch: int) -> tf.data.Dataset:
        """Epoch ``epoch``'s batches (order keyed by (seed, task, epoch)); with a buffer each
        image is paired with a stored one, drawn from fresh permutations of the buffer."""
        cfg = self.config
        y = task.y_train.astype(np.int32)
        order = np.random.default_rng((cfg.seed, _DATA, task.index, epoch)).permutation(len(y))
        data = {"x": task.x_train[order], "y": y[order]}
        if self.buffer is not None:
            bx, by = self.buffer
            rng = np.random.default_rng((cfg.seed, _MEMORY, task.index, epoch))
            rounds = -(-len(y) // len(by))
            pick = np.concatenate([rng.permutation(len(by)) for _ in range(rounds)])[: len(y)]
            data.update(mx=bx[pick], my=by[pick])
        return epoch_pipeline(tf.data.Dataset.from_tensor_slices(data).batch(cfg.batch_size))

    def _all_logits(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([
            self._logits_fn(tf.convert_to_tensor(images[i: i + _EVAL_BATCH], tf.float32)).numpy()
            for i in range(0, len(images), _EVAL_BATCH)
        ])

    def _validation_pct(self, task: TaskData) -> float:
        """Validation accuracy (%) on the task's validation data: task heads, the argmax
        among its classes; single head, over every output (NISPA_Replay's test)."""
        logits = self._all_logits(task.x_val)
        if self.task_heads:
            predictions = metrics.task_aware_predictions(logits, task.labels)
        else:
            predictions = np.argmax(logits, axis=1)
        return 100.0 * float(np.mean(predictions == task.y_val))

    def _mean_activations(self, images: np.ndarray) -> list[np.ndarray]:
        """Mean post-ReLU activation per hidden unit over ``images`` (conv: summed over
        space), NISPA/NISPA/utils.py ``compute_average_activation``; summed per batch in
        float32, across batches in float64."""
        totals = None
        for i in range(0, len(images), _EVAL_BATCH):
            sums = [s.numpy().astype(np.float64) for s in
                    self._unit_sums_fn(tf.convert_to_tensor(images[i: i + _EVAL_BATCH], tf.float32))]
            totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
        return [t / len(images) for t in totals]

    # -- classifier ------------------------------------------------------------------------

    def classifier_logits(self, images: np.ndarray) -> np.ndarray:
        return self._logits_fn(tf.convert_to_tensor(images, tf.float32)).numpy()[:, : len(self.seen_labels)]

    def classifier_for_export(self):
        network, seen = self.network, len(self.seen_labels)
        return network, lambda images: network(images, training=False)[:, :seen]

    def classifier_weights(self) -> list[np.ndarray]:
        """Per sparse layer: kernel, bias, connectivity (boolean). The frozen masks do not
        change predictions (and change only at task end)."""
        out = []
        for layer in self.network.sparse_layers:
            out += [np.array(layer.kernel.numpy(), copy=True), np.array(layer.bias.numpy(), copy=True),
                    layer.connection_mask()]
        return out

    def set_classifier_weights(self, weights) -> None:
        layers = self.network.sparse_layers
        if len(weights) != 3 * len(layers):
            raise ValueError(f"nispa: {len(weights)} arrays for {len(layers)} sparse layers (3 each)")
        for i, layer in enumerate(layers):
            kernel, bias, mask = weights[3 * i: 3 * i + 3]
            if tuple(np.shape(kernel)) != tuple(layer.kernel.shape) or tuple(np.shape(bias)) != tuple(layer.bias.shape):
                raise ValueError(
                    f"nispa: weights of shape {np.shape(kernel)} for {layer.name} {tuple(layer.kernel.shape)}"
                )
            layer.kernel.assign(np.asarray(kernel, np.float32))
            layer.bias.assign(np.asarray(bias, np.float32))
            layer.set_connectivity(np.asarray(mask, bool))

    def replay_examples(self, n: int):
        if self.buffer is None:
            return None
        return self.buffer[0][:n], self.buffer[1][:n]

    def capacity(self) -> dict[str, dict[str, float]]:
        """Per layer, shares of its existing connections frozen (``reserved``), not
        (``free``) and frozen by the last task (``task_used``)."""
        if not self.history:
            return {}
        last = self.history[-1]
        out = {}
        for layer, n, frozen, new in zip(self.network.sparse_layers, last["connections"],
                                         last["frozen_connections"], last["newly_frozen"]):
            n = max(n, 1)
            out[layer.name] = {"reserved": frozen / n, "free": 1.0 - frozen / n, "task_used": new / n}
        return out

    def task_summary(self) -> dict:
        return dict(self.history[-1]) if self.history else {}

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint_state(self, during_task: bool = True):
        """The network (masks and frozen masks as booleans), the stable sets, the buffer
        (a shared blob per task) and, during a task, the phase state with its weights
        and the optimizer's slots. Nothing random: every draw is keyed by (seed, task,
        phase or epoch)."""
        state = {
            "network": self.kind, "heads": self.config.nispa_heads, "seen_labels": list(self.seen_labels),
            "history": self.history, "has_task_stable": self.task_stable is not None,
            "buffer_key": self.buffer_key, "phase_state": None,
        }
        arrays: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self.network.sparse_layers):
            kernel_frozen, bias_frozen = layer.frozen_masks()
            arrays.update({
                f"nispa/net/{i:02d}/kernel": layer.kernel.numpy(), f"nispa/net/{i:02d}/bias": layer.bias.numpy(),
                f"nispa/net/{i:02d}/mask": layer.connection_mask(),
                f"nispa/net/{i:02d}/kernel_frozen": kernel_frozen, f"nispa/net/{i:02d}/bias_frozen": bias_frozen,
            })
        _put_list(arrays, "nispa/task_stable", self.task_stable)
        shared = {}
        if self.buffer is not None:
            shared[self.buffer_key] = {"x": self.buffer[0], "y": self.buffer[1]}
        st = self._st
        if during_task and st is not None:
            state["phase_state"] = st.state()
            _put_list(arrays, "nispa/phase_best", st.phase_best)
            _put_list(arrays, "nispa/prev", st.prev_weights)
            _put_list(arrays, "nispa/stable", st.stable)
            _put_list(arrays, "nispa/prev_stable", st.prev_stable)
            _put_list(arrays, "nispa/optimizer", [v.numpy() for v in self.trainer.optimizer.variables])
        return state, arrays, shared

    def restore_checkpoint(self, state, arrays, shared, task: TaskData | None) -> None:
        for key, now in (("network", self.kind), ("heads", self.config.nispa_heads)):
            if state[key] != now:
                raise ValueError(f"checkpoint has nispa {key} {state[key]!r}, not {now!r}")
        for i, layer in enumerate(self.network.sparse_layers):
            layer.kernel.assign(arrays[f"nispa/net/{i:02d}/kernel"])
            layer.bias.assign(arrays[f"nispa/net/{i:02d}/bias"])
            layer.set_connectivity(arrays[f"nispa/net/{i:02d}/mask"])
            layer.set_frozen(arrays[f"nispa/net/{i:02d}/kernel_frozen"], arrays[f"nispa/net/{i:02d}/bias_frozen"])
        self.seen_labels = list(state["seen_labels"])
        self.history = list(state["history"])
        self.task_stable = _get_list(arrays, "nispa/task_stable") if state["has_task_stable"] else None
        self.buffer_key = state["buffer_key"]
        if self.buffer_key is not None:
            blob = shared[self.buffer_key]
            self.buffer = (np.asarray(blob["x"], np.float32), np.asarray(blob["y"], np.int32))
        else:
            self.buffer = None
        self._st = None
        if task is None:
            return
        ps = state["phase_state"]
        if ps is None or ps["task"] != task.index:
            raise ValueError(f"checkpoint holds no phase state of task {task.index}")
        self._ensure_trainer()
        self._set_head(task)
        st = _PhaseState.from_state(ps)
        st.phase_best = _get_list(arrays, "nispa/phase_best") if ps["has_phase_best"] else None
        st.prev_weights = _get_list(arrays, "nispa/prev") if ps["has_prev"] else None
        st.stable = _get_list(arrays, "nispa/stable") if ps["has_stable"] else None
        st.prev_stable = _get_list(arrays, "nispa/prev_stable") if ps["has_prev_stable"] else None
        optimizer = _get_list(arrays, "nispa/optimizer")
        variables = self.trainer.optimizer.variables
        if len(optimizer) != len(variables):
            raise ValueError(f"checkpoint has {len(optimizer)} optimizer arrays for {len(variables)} variables")
        for v, value in zip(variables, optimizer):
            v.assign(value)
        self._st = st


def _put_list(arrays: dict, prefix: str, values) -> None:
    for i, value in enumerate(values or []):
        arrays[f"{prefix}/{i:04d}"] = np.asarray(value)


def _get_list(arrays: dict, prefix: str) -> list[np.ndarray]:
    keys = sorted(k for k in arrays if k.startswith(prefix + "/") and k[len(prefix) + 1:].isdigit())
    return [np.asarray(arrays[k]) for k in keys]
