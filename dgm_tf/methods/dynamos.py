"""Dynamos on the engine: a gated ResNet trained with REINFORCE gates, a prototype loss
and rehearsal from a reservoir of correctly classified samples (``--method=dynamos``).

Dynamos (Varma, Arani, Zonooz, "Dynamically Modular and Sparse General Continual
Learning", arXiv 2301.00620; reference code github NeurAI-Lab/DynamicContinualLearning,
models/dynamos.py ``Dynamos.observe``). The pure pieces (losses, warm-up rule, buffer,
the reference's best settings) are in ``dgm_tf.methods.dynamos_core``, the agents in
``dgm_tf.layers.gating``, the network in ``dgm_tf.models.dynamos_net``; this file runs
them task by task. One step, as ``observe`` does it:

1. the current batch, gated: CE + reward_weight * policy + prototype_weight * prototype
   (the prototype over the batch's correctly classified samples, when more than 2);
2. a buffer batch drawn before this step's additions, gated: alpha * MSE(logits,
   stored) + policy_alpha * MSE(policy logits, stored) + beta * (CE + reward_weight *
   policy) + prototype_weight * prototype;
3. one SGD step (``--dynamos_lr``, no momentum) on the sum;
4. the current batch offered to the buffer with the logits and policy logits of step 1
   (before the update), each sample stored only if it was classified correctly.

Warm-up (``dynamos_core.ungated_warmup``): the run's first ``--dynamos_warmup`` epochs,
or steps when every task is one epoch, train with CE only and store nothing.

Deviations, each for one reason: the step is one traced graph, the same on every
replica and for every step (no branch holds a synchronisation point, which
MirroredStrategy cannot run inside control flow):

* Warm-up steps run the gated network with every gate forced open (its noise set to
  -1, so action = noise < p is 1) instead of the ungated one: the same function of the
  trunk, and the policy and prototype terms get weight 0. Only the agents' BatchNorm
  moving statistics see these batches (the reference's do not); they decay by 0.9 per
  step (PyTorch's momentum 0.1) and are below 1e-4 of their start 90 steps later.
* Rehearsal starts once the buffer holds a full buffer batch (the reference: once it
  holds one sample, with a smaller batch); until then the buffer batch is computed with
  weight 0 (BatchNorm moving statistics again the only trace). With batch 10 this is
  the first one or two steps after the warm-up.
* The head grows with the classes seen (the reference's has every class from the
  start), so stored logits are compared on the width they were stored with
  (``dynamos_core.logit_replay_mse``).
* Images are the engine's 32x32 in [-1, 1] (the reference's seq-MNIST: 28x28 in [0, 1]).

Under N replicas every replica receives the global batch and trains on its rows
(``dgm_tf.replica``): per-sample terms are shares of global means, the prototype losses
see the global batch's policy logits (``all_gather``, whose gradient sums the replicas'
and hands each its rows) and enter as 1/N each, and the buffer is replicated: every
replica holds it and applies the same update from the gathered global batch. A run's
randomness is stateless and keyed by (seed, task, step, stream), so nothing random is
checkpointed and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from dgm_tf.config import Config, ConfigError
from dgm_tf.data import Scenario, TaskData
from dgm_tf.methods import dynamos_core as core
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
from dgm_tf.models.dynamos_net import DynamosResNet
from dgm_tf.replica import batch_free, global_count, global_mean, local_share, replica_sum, replicas

_DATA_STREAM = 17  # keys Dynamos's per-epoch data order apart from other seeded streams
# Images per batch of the end-of-task gate statistics (inference; samples independent).
_STATS_BATCH = 256
_STATS_IMAGES = 1024


def gather_global(values):
    """The global batch of every tensor of ``values`` (a nest, batch on axis 0): the
    replicas' rows concatenated in replica order, the same on every replica and
    differentiable (``ReplicaContext.all_gather``); the values themselves on one."""
    if replicas() == 1:
        return values
    return tf.distribute.get_replica_context().all_gather(values, axis=0)


class DynamosTrainer(TrackedTrainer):
    """One Dynamos step per batch (module docstring), for one task.

    Inputs per step: ``{"x", "y", "warm", "key"}``; ``warm`` (bool) and ``key`` (the
    step's index within the task, int64) are the same on every row of a batch.
    """

    LOGS = ("loss", "ce", "policy", "prototype", "acc", "keep", "buffer_mse_logits", "buffer_mse_policy",
            "buffer_ce", "buffer_policy", "buffer_prototype", "rehearsing")

    def __init__(self, network: DynamosResNet, memory: core.ReservoirMemory, config: Config, *, task: int):
        super().__init__(f"dynamos_task_{task}", network.trainable_variables, self.LOGS)
        self.network = network
        self.memory = memory
        self.task = int(task)
        self.seed = int(config.seed)
        self.buffer_batch = int(config.dynamos_buffer_batch)
        self.w = dict(alpha=config.dynamos_alpha, beta=config.dynamos_beta, policy_alpha=config.dynamos_policy_alpha,
                      reward=config.dynamos_reward_weight, prototype=config.dynamos_prototype_weight)
        self.keep_ratio = float(config.dynamos_keep_ratio)
        self.penalty = float(config.dynamos_policy_penalty)

    def _terms(self, out, y, y_global, count):
        """(CE share, policy share, prototype share [batch-free], hits share, keep share,
        global logits, global policy logits) of one gated forward."""
        net = self.network
        ce = keras.losses.sparse_categorical_crossentropy(y, out["logits"], from_logits=True)
        policy = core.policy_loss(out["logits"], y, out["actions"], out["policy_logits"], net.agent_channels,
                                  self.keep_ratio, self.penalty, net.temperature)
        logits_g, policy_g = gather_global((out["logits"], out["policy_logits"]))
        correct_g = core.correct_predictions(logits_g, y_global)
        prototype = core.prototype_loss(policy_g, y_global, correct_g)
        hits = tf.cast(core.correct_predictions(out["logits"], y), tf.float32)
        keep = tf.reduce_mean(tf.cast(out["actions"], tf.float32), axis=1)
        return (global_mean(ce, count), global_mean(policy, count), prototype, global_mean(hits, count),
                global_mean(keep, count), logits_g, policy_g)

    def _loss(self, ce, policy, prototype, b_mse, b_pmse, b_ce, b_policy, b_prototype, gated, replay_w):
        """The step's total (module docstring): the current batch's terms, the policy
        and prototype ones weighted by ``gated`` (0 in warm-up), plus the buffer batch's
        weighted by ``replay_w`` (0 until the buffer holds a full buffer batch)."""
        w = self.w
        current = ce + gated * (w["reward"] * policy + w["prototype"] * prototype)
        replay = (w["alpha"] * b_mse + w["policy_alpha"] * b_pmse + w["beta"] * (b_ce + w["reward"] * b_policy)
                  + w["prototype"] * b_prototype)
        return current + replay_w * replay

    def train_step(self, data):
        x_all, y_all = data["x"], tf.cast(data["y"], tf.int64)
        warm = tf.reshape(data["warm"], [-1])[0]
        key = tf.reshape(data["key"], [-1])[0]
        gated = tf.cast(tf.logical_not(warm), tf.float32)
        net, memory = self.network, self.memory
        batch = tf.shape(x_all)[0]
        seed = lambda stream: core.step_seed(self.seed, self.task, key, stream)  # noqa: E731
        # Gate noise for the global batch (-1 in warm-up: every gate open), split with it.
        noise_all = tf.where(warm, -tf.ones([batch, net.gate_width]),
                             net.gate_noise(seed(core.STREAM_GATES), batch))
        # The buffer batch is drawn before this step's additions (observe's order).
        stored = memory.sample(self.buffer_batch, seed(core.STREAM_BUFFER_SAMPLE))
        rehearsing = tf.logical_and(tf.logical_not(warm), memory.count() >= self.buffer_batch)
        replay_w = tf.cast(rehearsing, tf.float32)
        buffer_noise_all = net.gate_noise(seed(core.STREAM_BUFFER_GATES), self.buffer_batch)
        x, y, noise = local_share((x_all, y_all, noise_all))
        bx, by, blogits, bwidths, bpolicy, bnoise = local_share(
            (stored["examples"], stored["labels"], stored["logits"], stored["widths"], stored["policy_logits"],
             buffer_noise_all))
        n, nb = global_count(y), global_count(by)
        with tf.GradientTape() as tape:
            out = net(x, training=True, gate_noise=noise)
            ce, policy, prototype, hits, keep, logits_g, policy_g = self._terms(out, y, y_all, n)
            bout = net(bx, training=True, gate_noise=bnoise)
            b_ce, b_policy, b_prototype, _, _, _, _ = self._terms(bout, by, stored["labels"], nb)
            b_mse = global_mean(core.logit_replay_mse(bout["logits"], blogits, bwidths), nb)
            b_pmse = global_mean(core.logit_replay_mse(bout["policy_logits"], bpolicy), nb)
            # This replica's share: the prototype losses (whole-batch values) as 1/N each.
            loss = self._loss(ce, policy, batch_free(prototype), b_mse, b_pmse, b_ce, b_policy,
                              batch_free(b_prototype), gated, replay_w)
        grads = tape.gradient(loss, self.trained_variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self.trained_variables)]
        self.optimizer.apply_gradients(zip(grads, self.trained_variables))
        # Offer the global batch with the pre-update outputs (not in warm-up).
        memory.add(x_all, y_all, logits_g, policy_g, seed(core.STREAM_BUFFER_ADD), enabled=tf.logical_not(warm))
        ce_g, policy_gl, hits_g, keep_g, b_ce_g, b_policy_g, b_mse_g, b_pmse_g = replica_sum(
            (ce, policy, hits, keep, b_ce, b_policy, b_mse, b_pmse))
        step = {
            "loss": self._loss(ce_g, policy_gl, prototype, b_mse_g, b_pmse_g, b_ce_g, b_policy_g, b_prototype,
                               gated, replay_w),
            "ce": ce_g, "policy": gated * policy_gl, "prototype": gated * prototype, "acc": hits_g,
            "keep": keep_g, "buffer_mse_logits": replay_w * b_mse_g, "buffer_mse_policy": replay_w * b_pmse_g,
            "buffer_ce": replay_w * b_ce_g, "buffer_policy": replay_w * b_policy_g,
            "buffer_prototype": replay_w * b_prototype, "rehearsing": replay_w,
        }
        for name, value in step.items():
            self.trackers[name].update_state(value)
        logs = {name: t.result() for name, t in self.trackers.items()}
        logs.update({f"{name}_step": tf.identity(value) for name, value in step.items()})
        logs["buffer_filled"] = tf.cast(memory.count(), tf.float32)
        return logs


class Dynamos(ContinualMethod):
    """Dynamos (arXiv 2301.00620): the module docstring maps the reference to code."""

    name = "dynamos"
    fresh_networks_each_task = True  # the head grows into a new network (with_classes)

    def __init__(self, config: Config, scenario: Scenario):
        super().__init__(config, scenario)
        self.image_shape = tuple(int(d) for d in scenario.image_shape)
        if self.image_shape[-1] not in (1, 3):
            raise ConfigError(f"--dataset: dynamos reads 1- or 3-channel images, got {self.image_shape[-1]} channels")
        self.num_classes = int(scenario.num_classes)
        self.network: DynamosResNet | None = None
        self.memory: core.ReservoirMemory | None = None
        self.trainer: DynamosTrainer | None = None
        self.seen_labels: list[int] = []
        self.history: list[dict] = []
        self._classify = None

    # -- hooks ---------------------------------------------------------------------------

    def _build(self, num_seen: int) -> None:
        cfg = self.config
        self.network = DynamosResNet(num_seen, image_channels=self.image_shape[-1], image_size=self.image_shape[0],
                                     nf=cfg.dynamos_nf, name="dynamos_resnet")
        if self.memory is None:
            self.memory = core.ReservoirMemory(cfg.replay_buffer, self.image_shape, self.num_classes,
                                               self.network.gate_width)

    def begin_task(self, task: TaskData) -> None:
        # New head rows (and the first network) come from Keras's global RNG, reseeded
        # per task so a run resumed at a task boundary builds the same ones.
        keras.utils.set_random_seed(task_seed(self.config.seed, task.index))
        self.seen_labels += list(task.labels)
        if max(task.labels) >= len(self.seen_labels):
            raise ValueError(f"task {task.index} has labels {list(task.labels)}; expected 0..seen-1 in task order")
        if self.network is None:
            self._build(len(self.seen_labels))
        else:
            self.network = self.network.with_classes(len(self.seen_labels))
        self._make_trainer(task)

    def _make_trainer(self, task: TaskData) -> None:
        self.trainer = DynamosTrainer(self.network, self.memory, self.config, task=task.index)
        # The reference's SGD (models/utils/continual_model.py): no momentum, no decay.
        # Stateless but for its step counter, so a fresh one per task changes nothing.
        self.trainer.compile(keras.optimizers.SGD(self.config.dynamos_lr, momentum=0.0))
        self._set_classifier()

    def _set_classifier(self) -> None:
        network = self.network
        self._classify = images_function(lambda x: network.classify(x), self.scenario.image_shape)

    def train_dataset(self, task: TaskData, epoch: int) -> tf.data.Dataset:
        """Epoch ``epoch``'s batches in an order keyed by (seed, task, epoch), each row
        with its step's warm-up flag and key (its index within the task)."""
        cfg = self.config
        n = len(task.y_train)
        steps = math.ceil(n / cfg.batch_size)
        order = np.random.default_rng((cfg.seed, _DATA_STREAM, task.index, epoch)).permutation(n)
        step_of_row = np.arange(n) // cfg.batch_size
        warm = np.array([core.ungated_warmup(task.index, epoch, s, cfg.epochs, cfg.dynamos_warmup)
                         for s in range(steps)], bool)[step_of_row]
        key = (epoch * steps + step_of_row).astype(np.int64)
        return epoch_pipeline(tf.data.Dataset.from_tensor_slices({
            "x": task.x_train[order], "y": task.y_train[order].astype(np.int64), "warm": warm, "key": key,
        }).batch(cfg.batch_size))

    def train_task(self, task: TaskData, callbacks: Sequence[keras.callbacks.Callback], initial_epoch: int = 0) -> None:
        fit_epochs(self.trainer, lambda epoch: self.train_dataset(task, epoch), initial_epoch, self.config.epochs,
                   callbacks)

    def end_task(self, task: TaskData) -> None:
        state = self.memory.state()
        filled = state["filled"]
        per_class = np.bincount(state["labels"][filled], minlength=len(self.seen_labels))
        images = task.x_train[:_STATS_IMAGES]
        kept = [self.network(images[i: i + _STATS_BATCH], training=False)["actions"].numpy()
                for i in range(0, len(images), _STATS_BATCH)]
        self.history.append({
            "classifier": "dynamos_resnet",
            "classifier_params": int(sum(int(np.prod(v.shape)) for v in self.network.trainable_variables)),
            "num_classes": len(self.seen_labels),
            "buffer_size": self.memory.size,
            "buffer_filled": int(filled.sum()),
            "buffer_seen": int(state["seen"]),
            "buffer_per_class": [int(c) for c in per_class],
            "buffer_bytes": self.memory.nbytes,
            # Share of gated channels kept at inference on (up to 1024 of) the task's
            # training images: the sparsity the gates learned.
            "gate_keep_fraction": float(np.mean(np.concatenate(kept))),
        })

    # -- classifier ----------------------------------------------------------------------

    def classifier_logits(self, images: np.ndarray) -> np.ndarray:
        return self._classify(tf.convert_to_tensor(images, tf.float32)).numpy()

    def classifier_for_export(self):
        """The gated network at inference (gates thresholded at 0.5): the buffer is not
        part of it, so the export holds no stored image."""
        network = self.network
        return network, lambda images: network.classify(images)

    def classifier_weights(self) -> list[np.ndarray]:
        return copy_weights(self.network)

    def set_classifier_weights(self, weights) -> None:
        assign_weights(self.network, weights)

    def replay_examples(self, n: int):
        if self.memory is None:
            return None
        filled = self.memory.filled.numpy()
        slots = np.flatnonzero(filled)[:n]
        if not slots.size:
            return None
        return self.memory.examples.numpy()[slots], self.memory.labels.numpy()[slots].astype(np.int32)

    def task_summary(self) -> dict:
        return dict(self.history[-1]) if self.history else {}

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint_state(self, during_task: bool = True):
        """The network (weights and BN statistics), the buffer and, during a task, the
        optimizer's step. Nothing random: every draw is keyed by (seed, task, step)."""
        state = {"seen_labels": list(self.seen_labels), "history": self.history,
                 "trainer_task": self.trainer.task if (during_task and self.trainer is not None) else None,
                 "nf": self.config.dynamos_nf, "buffer_size": self.config.replay_buffer}
        arrays = {}
        if self.network is not None:
            store_variables(arrays, "dynamos/net", self.network.weights)
            for name, value in self.memory.state().items():
                arrays[f"dynamos/buffer/{name}"] = value
        if during_task and self.trainer is not None:
            store_variables(arrays, "dynamos/optimizer", self.trainer.optimizer.variables)
        return state, arrays, {}

    def restore_checkpoint(self, state, arrays, shared, task: TaskData | None) -> None:
        for key, now in (("nf", self.config.dynamos_nf), ("buffer_size", self.config.replay_buffer)):
            if state[key] != now:
                raise ValueError(f"checkpoint has dynamos {key} {state[key]!r}, not {now!r}")
        self.seen_labels = list(state["seen_labels"])
        self.history = list(state["history"])
        self.trainer = None
        if not self.seen_labels:
            return
        self._build(len(self.seen_labels))
        load_variables(self.network.weights, arrays, "dynamos/net", "dynamos weights")
        self.memory.restore({name: arrays[f"dynamos/buffer/{name}"] for name in self.memory.variables})
        if task is not None:
            if state.get("trainer_task") != task.index:
                raise ValueError(f"checkpoint was taken during task {state.get('trainer_task')}, not {task.index}")
            self._make_trainer(task)
            load_variables(self.trainer.optimizer.variables, arrays, "dynamos/optimizer", "optimizer slots")
        self._set_classifier()
