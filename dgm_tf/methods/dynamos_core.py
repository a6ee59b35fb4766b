"""Dynamos's pure pieces: the policy (REINFORCE) loss, the prototype loss, the replay
losses, the warm-up rule, the add-if-correct reservoir buffer and the reference's best
hyperparameters.

Dynamos (Varma, Arani, Zonooz, "Dynamically Modular and Sparse General Continual
Learning", VISAPP 2023, arXiv 2301.00620) gates the channels of a ResNet's second stage
with agents trained by REINFORCE to keep a fraction ``keep_ratio`` of them
(``dgm_tf.layers.gating``, ``dgm_tf.models.dynamos_net``), pulls the gating patterns of
same-class samples together (prototype loss), and rehearses from a reservoir buffer of
correctly classified samples with their logits and policy logits.

Reference: github NeurAI-Lab/DynamicContinualLearning (Mammoth-based). Each function
names the file it follows and where it departs from it. The step's total loss, as
``models/dynamos.py`` (``Dynamos.observe``) builds it, for the lead's trainer::

    current batch:  CE + reward_weight * policy + prototype_weight * prototype
    buffer batch:   alpha * MSE(logits, stored logits)
                    + policy_alpha * MSE(policy logits, stored policy logits)
                    + beta * (CE + reward_weight * policy)
                    + prototype_weight * prototype
    warm-up steps:  CE only, ungated, nothing stored, no buffer batch

Per-sample terms (CE, ``policy_loss``, ``logit_replay_mse``) are returned per sample
so a trainer sums them over its replica and divides by the global count
(``dgm_tf.replica.global_mean``). ``prototype_loss`` is a ratio of sums over *pairs*
of the batch and does not split into replica shares: under N replicas it must see the
global batch's policy logits (``ReplicaContext.all_gather``) and enter the loss through
``dgm_tf.replica.batch_free``; with one replica it is the plain value.

Every random draw (reservoir slots, replay samples, gate actions) is stateless, seeded
by ``step_seed(seed, task, step, stream)``: nothing random needs checkpointing and all
replicas draw the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from dgm_tf.layers.gating import TEMPERATURE

# Defaults of the reference's add_policy_args (utils/args.py) and every best_args entry.
KEEP_RATIO = 0.7
POLICY_PENALTY = -500.0
# Ungated warm-up: "no actions for first 10 epochs/iterations" (utils/args.py --warmup;
# utils/policy_training.py ``train``: ``set_warmup(epoch < 10)`` or ``set_warmup(i < 10)``).
WARMUP = 10
# Streams of step_seed within one step.
STREAM_BUFFER_SAMPLE = 0
STREAM_BUFFER_ADD = 1
STREAM_GATES = 2
STREAM_BUFFER_GATES = 3


# ------------------------------------------------------------------ hyperparameters

@dataclasses.dataclass(frozen=True)
class DynamosSettings:
    """One of the reference's best settings (utils/best_args.py, key ``dynamos``).

    ``buffer_batch_size`` is the reference's ``minibatch_size``, ``prototype_weight`` its
    ``prototype_loss``, ``epochs`` its ``n_epochs`` (per task). SGD without momentum
    (models/utils/continual_model.py), ``nf`` 32, the ungated warm-up on (``warmup:
    True``) in every entry.
    """

    dataset: str
    buffer_size: int
    lr: float
    batch_size: int
    buffer_batch_size: int
    epochs: int
    alpha: float
    beta: float
    policy_alpha: float
    policy_penalty: float
    reward_weight: float
    prototype_weight: float
    keep_ratio: float = KEEP_RATIO
    nf: int = 32
    warmup: bool = True
    temperature: float = TEMPERATURE


def _mnist(buffer_size, alpha, beta, penalty, reward_weight, prototype_weight):
    return DynamosSettings("seq-mnist", buffer_size, lr=0.07, batch_size=10, buffer_batch_size=10, epochs=1,
                           alpha=alpha, beta=beta, policy_alpha=0.2, policy_penalty=penalty,
                           reward_weight=reward_weight, prototype_weight=prototype_weight)


def _svhn(buffer_size, alpha, beta, policy_alpha):
    return DynamosSettings("seq-svhn", buffer_size, lr=0.07, batch_size=16, buffer_batch_size=16, epochs=70,
                           alpha=alpha, beta=beta, policy_alpha=policy_alpha, policy_penalty=-500.0,
                           reward_weight=1.0, prototype_weight=0.5)


# Checked value by value against NeurAI-Lab/DynamicContinualLearning, utils/best_args.py
# (commit e6d5509). seq-MNIST / seq-SVHN: 5 tasks of 2 classes (datasets/seq_*.py). The
# reference also lists mnist-360 (a general-continual stream, not a task sequence).
BEST_SETTINGS: dict[str, DynamosSettings] = {
    "seq_mnist_b500": _mnist(500, alpha=0.2, beta=2.0, penalty=-500.0, reward_weight=0.5, prototype_weight=0.3),
    "seq_mnist_b1000": _mnist(1000, alpha=0.1, beta=2.5, penalty=-200.0, reward_weight=0.7, prototype_weight=0.5),
    "seq_mnist_b2000": _mnist(2000, alpha=0.5, beta=3.0, penalty=-200.0, reward_weight=0.5, prototype_weight=0.5),
    "seq_svhn_b500": _svhn(500, alpha=2.0, beta=3.0, policy_alpha=1.0),
    "seq_svhn_b1000": _svhn(1000, alpha=2.5, beta=2.0, policy_alpha=0.2),
    "seq_svhn_b2000": _svhn(2000, alpha=2.5, beta=2.0, policy_alpha=0.2),
}


# --------------------------------------------------------------------- warm-up

def ungated_warmup(task: int, epoch: int, step: int, epochs_per_task: int, warmup: int = WARMUP) -> bool:
    """Whether this step trains ungated with CE only (and stores nothing).

    With one epoch per task: the first ``warmup`` steps of the run (task 0); otherwise
    the first ``warmup`` epochs of the run, counted across tasks. Follows
    utils/policy_training.py, ``train``: once the network leaves warm-up it never
    returns (``set_warmup`` is only called while ``get_warmup()`` holds). There, with 2
    to 10 epochs per task, ``set_warmup(epoch < 10)`` is true at every epoch of every
    task (the epoch index restarts per task), so the run never leaves warm-up; we count
    the run's epochs, which agrees with the reference whenever it leaves warm-up (1 or
    more than 10 epochs per task).
    """
    if min(task, epoch, step) < 0 or epochs_per_task < 1:
        raise ValueError("task, epoch and step must be >= 0 and epochs_per_task >= 1")
    if epochs_per_task == 1:
        return task == 0 and step < warmup
    return task * epochs_per_task + epoch < warmup


# ------------------------------------------------------------------- policy loss

def correct_predictions(class_logits, labels) -> tf.Tensor:
    """Boolean ``[N]``: argmax of the logits equals the label."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    return tf.equal(tf.argmax(class_logits, axis=-1, output_type=tf.int64), labels)


# PyTorch's Bernoulli(probs) clamps p to [eps, 1 - eps], eps = float32's machine epsilon
# (torch.distributions.utils.clamp_probs), before taking log p: log pi of a channel is
# bounded below by log(eps) = -15.94 and a saturated gate gets no gradient. In logit
# units the clamp is |z / T| <= log((1 - eps) / eps).
TORCH_FLOAT32_EPS = 1.1920928955078125e-07
LOGIT_CLAMP = float(np.log((1.0 - TORCH_FLOAT32_EPS) / TORCH_FLOAT32_EPS))


def bernoulli_log_prob(policy_logits, actions, temperature: float = TEMPERATURE) -> tf.Tensor:
    """log pi(action) per channel, with p = sigmoid(policy_logits / temperature), as the
    reference's ``Bernoulli(p).log_prob`` (backbone/GatedResNet.py ``Agent.forward``)
    computes it: p clamped to [eps, 1 - eps] first (``LOGIT_CLAMP``), so a saturated
    gate's log-probability stops at -15.94 and passes no gradient.

    log p = log_sigmoid(z / T) for a kept channel, log (1 - p) = log_sigmoid(-z / T) for
    a dropped one, on the clamped z / T (stable where p saturates).
    """
    z = tf.clip_by_value(tf.cast(policy_logits, tf.float32) / temperature, -LOGIT_CLAMP, LOGIT_CLAMP)
    actions = tf.cast(actions, tf.float32)
    return actions * tf.math.log_sigmoid(z) + (1.0 - actions) * tf.math.log_sigmoid(-z)


def agent_log_probs(policy_logits, actions, agent_channels: Sequence[int],
                    temperature: float = TEMPERATURE) -> tf.Tensor:
    """``[N, agents]``: log pi of each agent's action vector, the sum over its channels
    (the reference's ``log_probs.squeeze().sum(dim=1)`` per agent)."""
    per_channel = bernoulli_log_prob(policy_logits, actions, temperature)
    return tf.stack([tf.reduce_sum(part, axis=1) for part in tf.split(per_channel, list(agent_channels), axis=1)],
                    axis=1)


def gate_rewards(class_logits, labels, actions, agent_channels: Sequence[int], keep_ratio: float = KEEP_RATIO,
                 policy_penalty: float = POLICY_PENALTY) -> tf.Tensor:
    """``[N, agents]`` rewards: r = -(keep_ratio - mean(agent's actions))^2, multiplied by
    ``-policy_penalty`` (500 for the default -500) on a misclassified sample.

    With a negative penalty the factor is positive, so a misclassified sample's reward
    keeps its sign and is 500x as large (more negative): the issue's "opposite sign" is
    not what the code does (models/dynamos_sgd.py, ``get_reward``:
    ``rewards[preds_idx != labels] *= self.args.policy_penalty * -1.0``). No gradient.
    """
    actions = tf.cast(actions, tf.float32)
    kept = tf.stack([tf.reduce_mean(part, axis=1) for part in tf.split(actions, list(agent_channels), axis=1)],
                    axis=1)
    rewards = -tf.square(keep_ratio - kept)
    wrong = tf.logical_not(correct_predictions(class_logits, labels))
    factor = tf.where(wrong, tf.constant(-float(policy_penalty), tf.float32), tf.constant(1.0, tf.float32))
    return tf.stop_gradient(rewards * factor[:, None])


def policy_loss(class_logits, labels, actions, policy_logits, agent_channels: Sequence[int],
                keep_ratio: float = KEEP_RATIO, policy_penalty: float = POLICY_PENALTY,
                temperature: float = TEMPERATURE) -> tf.Tensor:
    """REINFORCE loss per sample, ``[N]``: the mean over agents of -log pi(actions) * r.

    The mean over samples of these values is the reference's
    ``(-log_probs * rewards).mean()`` over the ``[N, agents]`` matrix
    (utils/policy_losses.py, ``filter_loss``); gradients reach the agents through
    log pi only (actions and rewards are constants).
    """
    rewards = gate_rewards(class_logits, labels, actions, agent_channels, keep_ratio, policy_penalty)
    log_pi = agent_log_probs(policy_logits, actions, agent_channels, temperature)
    return tf.reduce_mean(-log_pi * rewards, axis=1)


# ---------------------------------------------------------------- prototype loss

def prototype_loss(policy_logits, labels, mask) -> tf.Tensor:
    """(1 + S_same / D) / (1 + S_diff / D) over the samples where ``mask`` holds, or 0
    when at most 2 samples are selected.

    S_same (S_diff): the sum over pairs i < j of selected samples with equal (different)
    labels of the squared distance ||z_i - z_j||^2 between their policy logits, D the
    logits' width. The trainer passes ``mask = correct_predictions(...)``. Follows
    models/dynamos_sgd.py, ``get_prototype_loss`` (applied when ``correct_locs.sum() >
    2``, models/dynamos.py); distances are computed as differences, not through
    ||a||^2 + ||b||^2 - 2ab (which can round below 0).
    """
    z = tf.cast(policy_logits, tf.float32)
    width = tf.cast(tf.shape(z)[1], tf.float32)
    selected = tf.cast(mask, tf.float32)
    distances = tf.reduce_sum(tf.square(z[:, None, :] - z[None, :, :]), axis=-1)
    n = tf.shape(z)[0]
    upper = tf.linalg.band_part(tf.ones([n, n], tf.float32), 0, -1) - tf.eye(n, dtype=tf.float32)
    pairs = upper * selected[:, None] * selected[None, :]
    labels = tf.reshape(labels, [-1])
    same = tf.cast(tf.equal(labels[:, None], labels[None, :]), tf.float32)
    s_same = tf.reduce_sum(distances * pairs * same) / width
    s_diff = tf.reduce_sum(distances * pairs * (1.0 - same)) / width
    loss = (1.0 + s_same) / (1.0 + s_diff)
    return tf.where(tf.reduce_sum(selected) > 2.0, loss, tf.zeros_like(loss))


# ------------------------------------------------------------------ replay losses

def logit_replay_mse(outputs, stored, widths=None) -> tf.Tensor:
    """Per-sample mean squared difference, ``[N]``, over each sample's first ``widths[i]``
    entries (all entries when ``widths`` is None).

    The reference's ``F.mse_loss(buf_outputs, buf_logits)`` (models/dynamos.py) averages
    over a head that has every class from the start. Our head grows, so a sample stored
    while it had k classes is compared on those k logits (its stored row is padded with
    zeros beyond them, ``ReservoirBuffer``); with equal widths the mean of these values
    is the reference's. Also used for the policy logits (fixed width).
    """
    outputs = tf.cast(outputs, tf.float32)
    stored = tf.cast(stored, tf.float32)
    k = tf.shape(outputs)[1]
    stored = stored[:, :k]
    if widths is None:
        return tf.reduce_mean(tf.square(outputs - stored), axis=1)
    widths = tf.cast(tf.reshape(widths, [-1]), tf.int32)
    valid = tf.cast(tf.range(k)[None, :] < widths[:, None], tf.float32)
    # An empty slot (width 0, drawn before the buffer fills; its term has weight 0) gives
    # 0, not 0/0: a NaN would poison the gradient even with weight 0.
    return tf.reduce_sum(tf.square(outputs - stored) * valid, axis=1) / tf.cast(tf.maximum(widths, 1), tf.float32)


# ----------------------------------------------------------------------- buffer

def step_seed(seed: int, task, key, stream: int) -> tf.Tensor:
    """A shape-[2] int64 seed for ``tf.random.stateless_*``, a pure function of the run's
    seed, the task, a step key (``DynamosTrainer``: the step's index within the task) and
    a stream number: a resumed run draws what the uninterrupted one drew, with no
    generator state to checkpoint, and every replica draws the same numbers."""
    base = tf.stack([tf.constant(int(seed), tf.int64), tf.cast(task, tf.int64)])
    keyed = tf.random.experimental.stateless_fold_in(base, tf.cast(key, tf.int64))
    return tf.random.experimental.stateless_fold_in(keyed, int(stream))


def reservoir_slots(seen, count, size: int, seed) -> tf.Tensor:
    """Slots for the next ``count`` stream items when ``seen`` came before: Algorithm R.

    Item number s (0-based) takes slot s while s < size; afterwards j ~ U{0..s} and it
    takes slot j if j < size, else none (-1), so every item of the stream is in the
    reservoir with probability size / (items so far). Follows utils/buffer.py,
    ``reservoir`` (``np.random.randint(0, seen + 1)``); the draws are stateless
    (``seed``), one per item, in float64 so that j is uniform for any stream length
    this class can see.
    """
    stream = tf.cast(seen, tf.int64) + tf.range(tf.cast(count, tf.int64), dtype=tf.int64)
    u = tf.random.stateless_uniform(tf.shape(stream), seed, dtype=tf.float64)
    draws = tf.minimum(tf.cast(tf.floor(u * tf.cast(stream + 1, tf.float64)), tf.int64), stream)
    late = tf.where(draws < size, draws, tf.constant(-1, tf.int64))
    return tf.where(stream < size, stream, late)


class ReservoirMemory:
    """Dynamos's rehearsal buffer as TensorFlow variables, updated inside the training step.

    For each incoming sample the seen count advances and ``reservoir_slots`` draws its
    slot; the sample is written there only if ``argmax(logits) == label`` at that moment
    (add-if-correct); within a batch a later sample wins a slot two samples drew. A slot
    holds the unaugmented input, the label, the logits (padded with zeros to
    ``num_classes``; ``widths`` keeps each row's width, the head's when it was stored)
    and the policy logits. Follows utils/buffer.py, ``Buffer`` with ``policy=True,
    add_if_correct=True`` (models/dynamos.py).

    Departure: the reference samples replay batches from the first ``min(seen, size)``
    slots, including slots whose fill-phase sample was misclassified and which still
    hold zeros (an all-zero image of label 0); here ``filled`` marks written slots and
    only those are sampled.

    Why variables: the buffer is read (``sample``) and written (``add``) by every step,
    so it lives in the traced step; under a strategy every replica holds the same buffer
    and applies the same update (the global batch, the same stateless draws), and the
    variables aggregate ONLY_FIRST_REPLICA, so the writes need no communication.

    Example:
        >>> memory = ReservoirMemory(500, (32, 32, 1), num_classes=10, policy_width=256)
        >>> slots = memory.add(x, y, logits, policy_logits, seed)  # -1: not written
        >>> batch = memory.sample(10, seed)  # dict, "valid" marks filled slots
    """

    def __init__(self, size: int, example_shape, num_classes: int, policy_width: int):
        self.size = int(size)
        if self.size < 1:
            raise ValueError(f"buffer size must be >= 1, got {size}")
        self.example_shape = tuple(int(d) for d in example_shape)
        self.num_classes = int(num_classes)
        self.policy_width = int(policy_width)

        def variable(shape, dtype, name):
            return tf.Variable(tf.zeros(shape, dtype), trainable=False, name=f"dynamos_buffer/{name}",
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        self.examples = variable((self.size,) + self.example_shape, tf.float32, "examples")
        self.labels = variable((self.size,), tf.int64, "labels")
        self.logits = variable((self.size, self.num_classes), tf.float32, "logits")
        self.widths = variable((self.size,), tf.int64, "widths")
        self.policy_logits = variable((self.size, self.policy_width), tf.float32, "policy_logits")
        self.filled = variable((self.size,), tf.bool, "filled")
        self.seen = variable((), tf.int64, "seen")

    @property
    def variables(self) -> dict[str, tf.Variable]:
        return {"examples": self.examples, "labels": self.labels, "logits": self.logits, "widths": self.widths,
                "policy_logits": self.policy_logits, "filled": self.filled, "seen": self.seen}

    @property
    def nbytes(self) -> int:
        return int(sum(v.shape.num_elements() * v.dtype.size for v in self.variables.values()))

    def count(self) -> tf.Tensor:
        """Filled slots (int64)."""
        return tf.reduce_sum(tf.cast(self.filled, tf.int64))

    def add(self, examples, labels, logits, policy_logits, seed, enabled=True) -> tf.Tensor:
        """Offer a batch in stream order; returns the slot written per sample (-1: none).
        ``enabled`` False (a traced boolean may be given) offers nothing and leaves the
        seen count as it is (the reference does not call ``add_data`` in warm-up)."""
        examples = tf.convert_to_tensor(examples, tf.float32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        logits = tf.convert_to_tensor(logits, tf.float32)
        policy_logits = tf.convert_to_tensor(policy_logits, tf.float32)
        n = tf.shape(labels)[0]
        width = tf.shape(logits)[1]
        enabled = tf.convert_to_tensor(enabled, tf.bool)
        slots = reservoir_slots(self.seen, n, self.size, seed)
        write = enabled & correct_predictions(logits, labels) & (slots >= 0)
        # A later sample of the batch that writes the same slot wins it.
        later = tf.linalg.band_part(tf.ones([n, n], tf.bool), 0, -1) & ~tf.eye(n, dtype=tf.bool)
        overwritten = tf.reduce_any(later & tf.equal(slots[:, None], slots[None, :]) & write[None, :], axis=1)
        keep = write & ~overwritten
        rows = tf.where(keep)[:, 0]
        index = tf.gather(slots, rows)[:, None]

        def put(variable, values):
            variable.assign(tf.tensor_scatter_nd_update(variable, index, tf.gather(values, rows)))

        put(self.examples, examples)
        put(self.labels, labels)
        put(self.logits, tf.pad(logits, [[0, 0], [0, self.num_classes - width]]))
        put(self.widths, tf.fill([n], tf.cast(width, tf.int64)))
        put(self.policy_logits, policy_logits)
        put(self.filled, tf.ones([n], tf.bool))
        self.seen.assign_add(tf.where(enabled, tf.cast(n, tf.int64), tf.constant(0, tf.int64)))
        return tf.where(keep, slots, tf.constant(-1, tf.int64))

    def sample(self, batch_size: int, seed) -> dict[str, tf.Tensor]:
        """``batch_size`` distinct slots drawn uniformly among the filled ones (the
        reference's ``get_data``, without replacement): a dict of ``examples, labels,
        logits, widths, policy_logits, slots`` and ``valid`` (False for rows beyond the
        filled count, which then come from empty slots). Needs ``batch_size <= size``."""
        keys = tf.where(self.filled, tf.random.stateless_uniform([self.size], seed), -1.0)
        _, slots = tf.math.top_k(keys, k=int(batch_size))
        out = {name: tf.gather(v, slots) for name, v in self.variables.items() if name not in ("filled", "seen")}
        out["valid"] = tf.gather(self.filled, slots)
        out["slots"] = tf.cast(slots, tf.int64)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Every variable's value, for a checkpoint (``restore`` inverts it)."""
        return {name: v.numpy() for name, v in self.variables.items()}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        for name, v in self.variables.items():
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(v.shape):
                raise ValueError(f"buffer state: {name!r} has shape {value.shape}, expected {tuple(v.shape)}")
            v.assign(value)
