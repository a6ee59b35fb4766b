"""Dynamic Generative Memory with weight masks (DGMw) or activation masks (DGMa).

Ostapenko, Puscas, Klein, Jähnichen, Nabi: "Learning to Remember: A Synaptic Plasticity
Driven Framework for Continual Learning", CVPR 2019. The semantics follow the authors'
code (SAP/machine-learning-dgm, approaches/DGMw.py and DGMa.py); ``../shared/DESIGN.md``
§2 lists them. One training iteration on task t, for one real batch, the same for both
mask kinds:

1. replay-classifier updates: the real batch plus a batch-sized slice of every past
   task's replay set, shuffled together and cut into t+1 chunks, one cross-entropy step
   of the discriminator's auxiliary head per chunk;
2. the WGAN-GP critic update on real data of task t;
3. the generator update with the mask regulariser; gradients of reserved weights
   zeroed, HAT compensation of embedding gradients, global-norm clipping, Adam.

The two variants differ only in what a mask gates and what follows from it, all outside
the training step: the mask's shape (``TaskMaskedConv2DTranspose``), which kernel
weights count as reserved (``kernel_gradient_masks``), the s schedule (per batch for
DGMw, per epoch for DGMa) and the growth rule.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dgm_tf.config import Config
from dgm_tf.data import Scenario, TaskData
from dgm_tf.loss_scaling import agree_on_overflow, loss_scale, maybe_loss_scaled, scaled_loss
from dgm_tf.methods.base import (
    ContinualMethod, assign_weights, copy_weights, epoch_pipeline, fit_epochs, images_function,
)
from dgm_tf.models import Discriminator, Generator, activation_growth_channels, growth_channels
from dgm_tf.models.resnet_critic import ResNet18Critic
from dgm_tf.replica import (
    batch_free, global_mean, local_share, replica_sum, replicas, shared_draw, update_weighted_mean,
)

# Numerical floor inside the square root of the gradient-penalty norm: keeps the
# gradient of ||g|| finite where g == 0 (PyTorch's norm backward returns 0 there).
_GP_NORM_EPS = 1e-12
# Generated images: noise is drawn 256 rows at a time (the random stream every replay
# set and checkpoint was made with: a 1024-row draw is another stream), and the generator
# runs on up to 1024 rows per call, where 4 eager calls of 256 cost 1.7x one of 1024
# (87 against 51 ms, 6-task DGMw generator, 2-core EPYC, oneDNN; the images were bit
# for bit the same there; tests/test_dgm.py pins the stream).
_GENERATION_BATCH = 256
_GENERATION_CALL_ROWS = 1024
_DATA_STREAM = 11  # keys the per-epoch data order apart from other seeded streams


def task_seed(seed: int, task: int) -> int:
    """Seed of the global Keras RNG at the start of ``task`` (initialisers)."""
    return (int(seed) * 1_000_003 + 7919 * (int(task) + 1)) % (2**31 - 1)


# --------------------------------------------------------------------------------------
# Pure pieces of the method, each pinned by a test.
# --------------------------------------------------------------------------------------


def s_schedule(
    epoch: int, epochs: int, offset: int, num_examples: int, smax: float, per_batch: bool = True
) -> tuple[float, float]:
    """The mask scale (s_epoch, s) for the batch starting at example ``offset``.

    Per epoch ``s_ep = (smax - 1/smax) * epoch / epochs + 1/smax``; inside the epoch
    (``per_batch``, DGMw) ``s = (s_ep - 1/s_ep) * offset / num_examples + 1/s_ep``
    (reference: approaches/DGMw.py, ``s_g_max`` and ``s_g``). While s_ep < 1 the inner
    ramp runs from 1/s_ep *down* to s_ep; the reference does exactly that and so do we.
    Without ``per_batch`` (DGMa) s = s_ep for the whole epoch (approaches/DGMa.py:
    ``s_g = s_g_max``), which makes the HAT factor's s_ep / s equal 1.
    """
    s_ep = (smax - 1.0 / smax) * epoch / epochs + 1.0 / smax
    if not per_batch:
        return s_ep, s_ep
    s = (s_ep - 1.0 / s_ep) * offset / num_examples + 1.0 / s_ep
    return s_ep, s


def mask_regularizer(masks: Sequence[tf.Tensor], reserved: Sequence[tf.Tensor] | None) -> tf.Tensor:
    """R = sum(m * (1 - m_pre)) / sum(1 - m_pre) over all masked layers.

    For the first task (no reserved weights) R = sum(m) / count(m). R is in [0, 1]: the
    fraction of still-free weights the current task claims (reference:
    approaches/DGMw.py ``criterion``).
    """
    if reserved is None:
        total = tf.add_n([tf.reduce_sum(m) for m in masks])
        count = float(sum(int(np.prod(m.shape)) for m in masks))
        return total / count
    free = [1.0 - tf.cast(r, masks[0].dtype) for r in reserved]
    total = tf.add_n([tf.reduce_sum(m * f) for m, f in zip(masks, free)])
    return total / tf.add_n([tf.reduce_sum(f) for f in free])


def hat_embedding_gradient_scale(embedding, s, s_epoch, thres_cosh: float = 50.0):
    """Factor that compensates embedding gradients for the sigmoid's scale (HAT).

    ``(s_ep / s) * (cosh(clamp(s * e, +-thres)) + 1) / (cosh(e) + 1)`` (Serra et al.,
    ICML 2018, Eq. 6 with DGM's per-batch s; reference: approaches/DGMw.py).
    """
    e = tf.convert_to_tensor(embedding)
    s = tf.cast(s, e.dtype)
    num = tf.cosh(tf.clip_by_value(s * e, -thres_cosh, thres_cosh)) + 1.0
    den = tf.cosh(e) + 1.0
    return tf.cast(s_epoch, e.dtype) / s * num / den


def scaled_lambda_mask(lambda_mask: float, widths: Sequence[int], initial_widths: Sequence[int]) -> float:
    """lambda_mask times current / initial generator size, in channels of the masked
    layers (reference: approaches/DGMw.py, ``lamb_G * total_size / free_size``)."""
    return lambda_mask * sum(widths) / sum(initial_widths)


def update_reserved(reserved: list[np.ndarray] | None, masks_at_smax: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Union of the earlier reserved masks with the task's mask binarised at >= 0.5."""
    binary = [(np.asarray(m) >= 0.5).astype(np.float32) for m in masks_at_smax]
    if reserved is None:
        return binary
    return [np.maximum(r, b) for r, b in zip(reserved, binary)]


def kernel_gradient_masks(
    mask_kind: str, reserved: Sequence[np.ndarray], kernel_shapes: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """Per masked layer, the 0/1 factor applied to the kernel's gradient (0: reserved).

    Weight masks (DGMw): ``1 - reserved`` (approaches/DGMw.py ``mask_back_G``).
    Activation masks (DGMa): a weight is reserved when both the output channel it
    writes and the input channel it reads are reserved, ``1 - min(post[out], pre[in])``
    with ``pre`` the previous masked layer's reserved channels; the first layer reads
    the noise, whose entries all count as reserved, so its factor is ``1 - post``
    (networks/net_DGMa.py ``get_view_for``; HAT, Serra et al., ICML 2018, Eq. 4).
    Kernels are (k, k, out, in).
    """
    if mask_kind == "weight":
        return [(1.0 - np.asarray(r, np.float32)) for r in reserved]
    factors = []
    for layer, (post, shape) in enumerate(zip(reserved, kernel_shapes)):
        pre = np.ones(shape[3], np.float32) if layer == 0 else np.asarray(reserved[layer - 1], np.float32)
        both = np.minimum(np.asarray(post, np.float32)[:, None], pre[None, :])
        factors.append(np.broadcast_to(1.0 - both, shape).astype(np.float32))
    return factors


def pad_reserved(reserved: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Zero-pad reserved masks (weight- or channel-shaped) to grown mask shapes: new
    weights and channels are free."""
    padded = []
    for r, shape in zip(reserved, shapes):
        pad = [(0, int(n) - int(o)) for n, o in zip(shape, r.shape)]
        padded.append(np.pad(r, pad))
    return padded


# --------------------------------------------------------------------------------------
# The per-task Keras model whose train_step is one DGM iteration.
# --------------------------------------------------------------------------------------


class DGMTaskTrainer(keras.Model):
    """One DGM training iteration per real batch, for one task.

    A new trainer is made for every task (after growth): Keras caches the traced
    training function, and a function traced before growth keeps updating the old
    variables without error. Making the trainer and its optimizers anew per task is
    also the reference's behaviour (optimizers recreated at every task start).

    The s schedule lives in two non-trainable variables (``s``, ``s_epoch``) that
    ``MaskScaleSchedule`` assigns before every batch, so changing s needs no retrace.

    Inputs per step: ``{"x", "y", "replay_x": tuple, "replay_y": tuple}`` with one
    replay entry per past task (the first task's batches have no replay keys).
    """

    def __init__(
        self,
        generator: Generator,
        discriminator: Discriminator,
        *,
        task: int,
        reserved: Sequence[np.ndarray] | None,
        kernel_grad_masks: Sequence[np.ndarray] | None,
        lambda_mask: float,
        lambda_gp: float,
        aux_g: bool,
        clip_norm: float,
        thres_cosh: float,
        seed: int,
    ):
        super().__init__(name=f"dgm_task_{task}")
        self.generator = generator
        self.discriminator = discriminator
        self.task = int(task)
        self.lambda_mask = float(lambda_mask)
        self.lambda_gp = float(lambda_gp)
        self.aux_g = bool(aux_g)
        self.clip_norm = float(clip_norm)
        self.thres_cosh = float(thres_cosh)
        self.reserved = None if reserved is None else [tf.constant(r, tf.float32) for r in reserved]
        self.kernel_grad_masks = (
            None if kernel_grad_masks is None else [tf.constant(m, tf.float32) for m in kernel_grad_masks]
        )
        self.s = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="s")
        self.s_epoch = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="s_epoch")
        self.rng = tf.random.Generator.from_seed(seed)
        self.g_variables = generator.task_trainable_variables(self.task)
        ids = {id(v): i for i, v in enumerate(self.g_variables)}
        self._kernel_index = [ids[id(c.kernel)] for c in generator.masked_convs]
        self._embedding_index = [ids[id(c.task_embeddings[self.task])] for c in generator.masked_convs]
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in (
                "d_loss", "gradient_penalty", "wasserstein", "g_loss", "mask_reg",
                "c_loss", "c_acc", "c_loss_real", "c_acc_real", "c_loss_replay", "c_acc_replay", "s",
                "lambda_mask",
            )
        }
        self.built = True

    @property
    def metrics(self):
        return list(self.trackers.values())

    def compile(self, d_optimizer, g_optimizer):
        super().compile(jit_compile=False)
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        # Build the slots now, outside the traced function.
        self.d_optimizer.build(self.discriminator.trainable_variables)
        self.g_optimizer.build(self.g_variables)

    # -- the three updates --------------------------------------------------------------

    def classifier_update(self, images, labels, is_replay=None, count=None):
        """One cross-entropy step of the auxiliary head on one chunk (this replica's
        rows of it; ``count``: rows in the whole chunk, all replicas together).

        ``is_replay`` (1.0 for generated samples) only splits the reported loss and
        accuracy into real and replayed data; the update is the same. Returns the
        chunk's loss and accuracy (global).
        """
        variables = self.discriminator.trainable_variables
        with tf.GradientTape() as tape:
            _, logits = self.discriminator(images, training=True)
            per_sample = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = global_mean(per_sample, count)  # this replica's share (dgm_tf.replica)
            target = scaled_loss(self.d_optimizer, loss)  # mixed_float16 (dgm_tf.loss_scaling)
        grads = tape.gradient(target, variables)
        # The reference (PyTorch 1.0) steps Adam on every discriminator parameter after
        # zero_grad(), so heads a loss does not reach still move with their momentum.
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        grads = agree_on_overflow(self.d_optimizer, grads)
        self.d_optimizer.apply_gradients(zip(grads, variables))
        hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
        if is_replay is not None:
            real = 1.0 - is_replay
            update_weighted_mean(self.trackers["c_loss_real"], per_sample, real)
            update_weighted_mean(self.trackers["c_acc_real"], hits, real)
            update_weighted_mean(self.trackers["c_loss_replay"], per_sample, is_replay)
            update_weighted_mean(self.trackers["c_acc_replay"], hits, is_replay)
        return replica_sum((loss, global_mean(hits, count)))

    def gradient_penalty(self, real, fake, alpha=None, whole_batch=False):
        """lambda_gp * mean((||grad_x D(x_hat)|| - 1)^2), x_hat = a*real + (1-a)*fake,
        a ~ U(0, 1) per sample (Gulrajani et al., NeurIPS 2017); ``alpha`` is drawn
        here when not given. ``whole_batch``: the arguments are the global batch (on
        every replica) and the plain mean is returned."""
        if alpha is None:
            alpha = self.rng.uniform([tf.shape(real)[0], 1, 1, 1], dtype=real.dtype)
        x_hat = alpha * real + (1.0 - alpha) * fake
        # Under mixed_float16 this inner backward pass is not loss-scaled: an overflow
        # here would make the penalty, hence the reported loss, non-finite (the run
        # stops on a non-finite loss), where an overflow of the outer, scaled pass only
        # makes the LossScaleOptimizer skip the step. Its values (the penalty drives
        # the per-image gradient norm to 1) sit far above float16's underflow.
        with tf.GradientTape() as tape:
            tape.watch(x_hat)
            critic, _ = self.discriminator(x_hat, training=True, whole_batch=whole_batch)
        grad = tape.gradient(critic, x_hat)
        norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3]) + _GP_NORM_EPS)
        return self.lambda_gp * tf.reduce_mean(tf.square(norm - 1.0))

    def critic_update(self, real, labels):
        """The WGAN-GP critic step on the global batch ``real``/``labels`` (this
        replica's rows of it); returns the global loss, penalty and Wasserstein estimate."""
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        # Drawn once for the global batch, in one device's order (noise, then alpha).
        z = shared_draw(lambda: self.generator.noise(labels, self.rng))
        alpha = shared_draw(lambda: self.rng.uniform([tf.shape(real)[0], 1, 1, 1], dtype=real.dtype))
        whole_real, whole_alpha = real, alpha
        real, labels, z, alpha = local_share((real, labels, z, alpha))
        fake = self.generator(z, labels, task=self.task, s=self.s, training=True)
        n = replicas()
        if n > 1:
            # The penalty's second-order gradient through all-reduced BN moments is
            # wrong in TensorFlow (ReplicaBatchNormalization): every replica computes
            # it on the whole batch with its own (hence global) moments, as one device,
            # and adds 1/N of it. Only the Wasserstein terms are split.
            whole_fake = tf.distribute.get_replica_context().all_gather(fake, axis=0)
        variables = self.discriminator.trainable_variables
        with tf.GradientTape() as tape:
            d_real, _ = self.discriminator(real, training=True)
            d_fake, _ = self.discriminator(fake, training=True)
            if n > 1:
                gp = batch_free(self.gradient_penalty(whole_real, whole_fake, whole_alpha, whole_batch=True))
            else:
                gp = self.gradient_penalty(real, fake, alpha)
            wasserstein = global_mean(d_real, count) - global_mean(d_fake, count)
            loss = -wasserstein + gp
            target = scaled_loss(self.d_optimizer, loss)
        grads = tape.gradient(target, variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        grads = agree_on_overflow(self.d_optimizer, grads)
        self.d_optimizer.apply_gradients(zip(grads, variables))
        return replica_sum((loss, gp, wasserstein))

    def generator_update(self, labels):
        """The generator step for the global ``labels`` (this replica's rows of them);
        returns the global loss and the mask regulariser."""
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        z = shared_draw(lambda: self.generator.noise(labels, self.rng))
        z, labels = local_share((z, labels))
        with tf.GradientTape() as tape:
            fake = self.generator(z, labels, task=self.task, s=self.s, training=True)
            d_fake, logits = self.discriminator(fake, training=True)
            reg = mask_regularizer(self.generator.masks(self.task, self.s), self.reserved)
            loss = -global_mean(d_fake, count) + batch_free(self.lambda_mask * reg)
            if self.aux_g:
                loss += global_mean(
                    keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True), count
                )
            target = scaled_loss(self.g_optimizer, loss)
        grads = tape.gradient(target, self.g_variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self.g_variables)]
        # Masking, HAT scaling and clipping act on the global gradient (clipping each
        # replica's share would clip a different vector): summed over the replicas
        # first, then divided by their number, since apply_gradients sums them again.
        grads = replica_sum(grads)
        grads = self.constrain_generator_gradients(grads)
        # Masking and HAT scaling are linear, so they commute with the loss scale; the
        # clip does not: clipping the scaled gradients at clip_norm * scale is clipping
        # the true ones at clip_norm. A non-finite gradient stays non-finite through
        # the clip, and the LossScaleOptimizer then skips the step.
        grads, _ = tf.clip_by_global_norm(grads, self.clip_norm * loss_scale(self.g_optimizer))
        n = replicas()
        if n > 1:
            grads = [g / n for g in grads]
        self.g_optimizer.apply_gradients(zip(grads, self.g_variables))
        return replica_sum(loss), reg

    def constrain_generator_gradients(self, grads):
        """Zero gradients of reserved weights; HAT-compensate embedding gradients."""
        grads = list(grads)
        for layer, (ki, ei) in enumerate(zip(self._kernel_index, self._embedding_index)):
            if self.kernel_grad_masks is not None:
                grads[ki] = grads[ki] * self.kernel_grad_masks[layer]
            grads[ei] = grads[ei] * hat_embedding_gradient_scale(
                self.g_variables[ei], self.s, self.s_epoch, self.thres_cosh
            )
        return grads

    def replay_classifier_updates(self, x, y, replay_x=(), replay_y=()):
        """The iteration's classifier phase: the real batch and the first ``len(x)``
        images of each past task's replay set, shuffled together, then one
        ``classifier_update`` per batch-sized chunk (t+1 at task t), in order.
        Returns the last chunk's loss and accuracy.

        The inputs are the global batch; the shuffle is drawn once for all replicas
        and each replica trains on its rows of every chunk, so the chunks stay
        sequential: each chunk's update, summed over the replicas, reads the weights
        the previous chunk's wrote.
        """
        b = tf.shape(x)[0]
        if replay_x:
            all_x = tf.concat([x] + [r[:b] for r in replay_x], axis=0)
            all_y = tf.concat([y] + [r[:b] for r in replay_y], axis=0)
            all_r = tf.concat(
                [tf.zeros([b])] + [tf.ones([tf.shape(r[:b])[0]]) for r in replay_x], axis=0
            )
            order = tf.argsort(shared_draw(lambda: self.rng.uniform([tf.shape(all_x)[0]])))
            all_x, all_y, all_r = tf.gather(all_x, order), tf.gather(all_y, order), tf.gather(all_r, order)
        else:
            all_x, all_y, all_r = x, y, tf.zeros([b])

        def chunk_update(k, c_loss, c_acc):
            chunk = slice(k * b, (k + 1) * b)
            count = tf.cast(tf.shape(all_y[chunk])[0], tf.float32)
            c_loss, c_acc = self.classifier_update(*local_share((all_x[chunk], all_y[chunk], all_r[chunk])), count)
            self.trackers["c_loss"].update_state(c_loss)
            self.trackers["c_acc"].update_state(c_acc)
            return k + 1, c_loss, c_acc

        if not replay_x:
            return chunk_update(0, None, None)[1:]
        if replicas() > 1:
            # apply_gradients sums over the replicas with a merge_call, which a
            # tf.while_loop body cannot hold: unrolled (t+1 copies, traced per task).
            c_loss = c_acc = None
            for k in range(len(replay_x) + 1):
                _, c_loss, c_acc = chunk_update(k, c_loss, c_acc)
            return c_loss, c_acc
        # One traced body for the t+1 chunks instead of t+1 unrolled copies: tracing
        # stays as fast at task 9 as at task 1 (README, Performance). One iteration
        # at a time, so every chunk's update reads the weights the previous one wrote.
        _, c_loss, c_acc = tf.while_loop(
            lambda k, *_: k < len(replay_x) + 1, chunk_update,
            (tf.constant(0), tf.constant(0.0), tf.constant(0.0)), parallel_iterations=1,
        )
        return c_loss, c_acc

    def train_step(self, data):
        x, y = data["x"], data["y"]
        c_loss, c_acc = self.replay_classifier_updates(x, y, data.get("replay_x", ()), data.get("replay_y", ()))
        d_loss, gp, wasserstein = self.critic_update(x, y)
        g_loss, reg = self.generator_update(y)
        step = {
            "d_loss": d_loss, "gradient_penalty": gp, "wasserstein": wasserstein,
            "g_loss": g_loss, "mask_reg": reg, "s": self.s, "c_loss": c_loss, "c_acc": c_acc,
            "lambda_mask": tf.constant(self.lambda_mask),  # after its generator-size scaling
        }
        for name in ("d_loss", "gradient_penalty", "wasserstein", "g_loss", "mask_reg", "s", "lambda_mask"):
            self.trackers[name].update_state(step[name])
        logs = {name: t.result() for name, t in self.trackers.items()}
        # This iteration's own values (the trackers hold the epoch's running means);
        # c_loss/c_acc here are those of the last classifier chunk.
        logs.update({f"{name}_step": tf.identity(value) for name, value in step.items()})
        return logs


class MaskScaleSchedule(keras.callbacks.Callback):
    """Assigns s and s_epoch before every batch (see ``s_schedule``)."""

    def __init__(
        self, trainer: DGMTaskTrainer, epochs: int, num_examples: int, batch_size: int, smax: float,
        per_batch: bool = True,
    ):
        super().__init__()
        self.trainer = trainer
        self.epochs, self.num_examples = epochs, num_examples
        self.batch_size, self.smax = batch_size, smax
        self.per_batch = per_batch
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        s_ep, s = s_schedule(
            self._epoch, self.epochs, batch * self.batch_size, self.num_examples, self.smax, self.per_batch
        )
        self.trainer.s_epoch.assign(s_ep)
        self.trainer.s.assign(s)


# --------------------------------------------------------------------------------------
# The method: hooks the engine drives.
# --------------------------------------------------------------------------------------


class DGM(ContinualMethod):
    """DGM's task-loop hooks around ``DGMTaskTrainer``, for either mask kind.

    Subclasses set ``name`` and ``mask_kind``; everything else is shared.
    """

    name = "dgm"
    fresh_networks_each_task = True  # a grown generator and a new (or widened) discriminator
    mask_kind = "weight"  # "weight" (DGMw) or "activation" (DGMa)
    # DGMw anneals s within every epoch, DGMa once per epoch (DESIGN.md §2).
    s_per_batch = True

    def __init__(self, config: Config, scenario: Scenario):
        super().__init__(config, scenario)
        if scenario.classes_per_task > 1 and not config.aux_g:
            # The critic is unconditional: without the ACGAN loss nothing makes the
            # generator draw class c for code c within a task, so replayed labels are
            # noise inside each old task (5x2 Fashion-MNIST: task-aware A_5 0.52 without,
            # README). The reference's multi-class setting (ImageNet) turns aux_G on.
            logging.warning(
                "%d classes per task with --noaux_g: the generator is not trained to follow its "
                "class code within a task, so replayed labels are unreliable; consider --aux_g",
                scenario.classes_per_task,
            )
        ngf = config.ngf
        self.initial_widths = (4 * ngf, 2 * ngf, ngf)
        self.image_channels = scenario.image_shape[-1]
        self.generator: Generator | None = None
        self.discriminator: Discriminator | None = None
        self.trainer: DGMTaskTrainer | None = None
        self.reserved: list[np.ndarray] | None = None  # union of binarised masks, per layer
        self.reserved_counts = [0, 0, 0]
        self.pending_growth = (0, 0, 0)
        self.replay: list[tuple[np.ndarray, np.ndarray]] = []
        self.history: list[dict] = []
        self._seen_labels: list[int] = []
        self._classify = None

    # -- hooks ---------------------------------------------------------------------------

    def begin_task(self, task: TaskData) -> None:
        cfg = self.config
        t = task.index
        # Every random initialisation of this task (growth, a fresh discriminator) is a
        # function of (seed, task), not of what ran before in this process, so a run
        # resumed at a task boundary builds the same networks.
        keras.utils.set_random_seed(task_seed(cfg.seed, t))
        labels = tuple(task.labels)
        if self.generator is None:
            self.generator = self._new_generator([self.initial_widths], [labels])
        else:
            # Growth and the new task's embedding row, BatchNorm and heads
            # (DESIGN.md §2, end of task, steps 2-4).
            self.generator = self.generator.grown(self.pending_growth, labels)
            self.reserved = pad_reserved(self.reserved, [c.mask_shape for c in self.generator.masked_convs])
        self._seen_labels += list(labels)
        num_seen = len(self._seen_labels)
        if self.discriminator is None or cfg.reinit_d:
            self.discriminator = self._new_discriminator(num_seen)
        else:
            self.discriminator = self.discriminator.with_classes(num_seen)
        self.replay = (
            self.build_replay(num_per_class=len(task.x_train), seed=cfg.seed * 1000 + t) if cfg.replay else []
        )
        self._make_trainer(task)

    def _make_trainer(self, task: TaskData) -> None:
        cfg = self.config
        t = task.index
        self.trainer = DGMTaskTrainer(
            self.generator,
            self.discriminator,
            task=t,
            reserved=self.reserved,
            kernel_grad_masks=None if self.reserved is None else kernel_gradient_masks(
                self.mask_kind, self.reserved, [tuple(c.kernel.shape) for c in self.generator.masked_convs]
            ),
            lambda_mask=scaled_lambda_mask(cfg.lambda_mask, self.generator.widths, self.initial_widths),
            lambda_gp=cfg.lambda_gp,
            aux_g=cfg.aux_g,
            clip_norm=cfg.clip_norm,
            thres_cosh=cfg.hat_thres_cosh,
            seed=cfg.seed * 1000 + t,
        )
        self.trainer.compile(self._adam(cfg.lr_d), self._adam(cfg.lr_g))
        self._set_classifier()

    def _new_generator(self, task_widths, task_classes) -> Generator:
        cfg = self.config
        return Generator(
            nz=cfg.nz, num_code_classes=self.scenario.num_classes, image_channels=self.image_channels,
            task_widths=task_widths, task_classes=task_classes, mask_kind=self.mask_kind, name="generator",
            dtype=cfg.precision,
        )

    def _new_discriminator(self, num_classes: int) -> Discriminator | ResNet18Critic:
        cfg = self.config
        if cfg.critic == "resnet18":
            return ResNet18Critic(num_classes, self.image_channels, name="discriminator", dtype=cfg.precision)
        return Discriminator(cfg.ndf, num_classes, self.image_channels, name="discriminator", dtype=cfg.precision)

    def _set_classifier(self) -> None:
        """The compiled inference function of the current discriminator's class head."""
        discriminator = self.discriminator
        self._classify = images_function(lambda x: discriminator(x, training=False)[1], self.scenario.image_shape)

    def _adam(self, lr: float):
        # PyTorch's Adam epsilon (1e-8), as the reference uses; Keras defaults to 1e-7.
        adam = keras.optimizers.Adam(lr, beta_1=self.config.beta1, beta_2=self.config.beta2, epsilon=1e-8)
        return maybe_loss_scaled(adam, self.config.precision)

    def build_replay(self, num_per_class: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """For every past task, ``num_per_class`` generated images of each of its classes
        with that task's mask at smax, shuffled (reference: approaches/DGMw.py,
        "Generating datasets"). Fixed for the whole task."""
        replay = []
        rng = np.random.default_rng(seed)
        for past in range(self.generator.num_tasks - 1):
            labels = np.repeat(np.array(self.generator.task_classes[past], np.int32), num_per_class)
            images = self.generate(labels, task=past, seed=int(rng.integers(2**31)))
            order = rng.permutation(len(labels))
            replay.append((images[order], labels[order]))
        return replay

    def generate(self, labels: np.ndarray, task: int, seed: int) -> np.ndarray:
        """Images of ``labels`` (all of ``task``) at s = smax, generator in inference mode."""
        rng = tf.random.Generator.from_seed(seed)
        out = []
        for start in range(0, len(labels), _GENERATION_CALL_ROWS):
            call = np.asarray(labels[start : start + _GENERATION_CALL_ROWS], np.int32)
            z = tf.concat([
                self.generator.noise(tf.constant(call[i : i + _GENERATION_BATCH]), rng)
                for i in range(0, len(call), _GENERATION_BATCH)
            ], axis=0)
            out.append(self.generator(z, tf.constant(call), task=task, s=self.config.smax, training=False).numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0,) + self.scenario.image_shape, np.float32)

    def train_dataset(self, task: TaskData, epoch: int) -> tf.data.Dataset:
        """Epoch ``epoch``'s batches: the task's real data in a fresh order, each zipped
        with a batch of every past task's replay set.

        The order is a pure function of (seed, task, epoch): a run resumed at epoch e
        reads exactly the batches the uninterrupted run read (tf.data's own reshuffling
        keeps hidden state across epochs, so it is not used). Each replay set is read as
        a stream of fresh permutations, as ``shuffle().repeat()`` would.
        """
        cfg = self.config
        n = len(task.x_train)
        rng = np.random.default_rng((cfg.seed, _DATA_STREAM, task.index, epoch))
        order = rng.permutation(n)

        def batches(arrays):
            return tf.data.Dataset.from_tensor_slices(arrays).batch(cfg.batch_size)

        steps = -(-n // cfg.batch_size)
        replay_x, replay_y = [], []
        for i, (x, y) in enumerate(self.replay):
            needed = steps * cfg.batch_size
            stream_rng = np.random.default_rng((cfg.seed, _DATA_STREAM, task.index, epoch, i + 1))
            idx = np.concatenate([stream_rng.permutation(len(y)) for _ in range(-(-needed // len(y)))])[:needed]
            replay_x.append(x[idx])
            replay_y.append(y[idx])
        # The step's input dict zipped from its parts: a ``map`` that built it would trace
        # (and AutoGraph-convert) its function again for every epoch's new dataset. The
        # replay streams are one dataset of tuples each for images and labels (all have
        # ``needed`` rows): two datasets per epoch, not two per earlier task, whose
        # creation was part of every epoch's ``other`` time at late tasks.
        inputs = {"x": batches(task.x_train[order]), "y": batches(task.y_train[order].astype(np.int32))}
        if replay_x:
            inputs.update(replay_x=batches(tuple(replay_x)), replay_y=batches(tuple(replay_y)))
        return epoch_pipeline(tf.data.Dataset.zip(inputs))

    def train_task(
        self, task: TaskData, callbacks: Sequence[keras.callbacks.Callback], initial_epoch: int = 0
    ) -> None:
        """Epochs ``initial_epoch`` .. epochs-1, one ``fit`` call per epoch (each on that
        epoch's dataset; the traced step is reused)."""
        cfg = self.config
        schedule = MaskScaleSchedule(
            self.trainer, cfg.epochs, len(task.x_train), cfg.batch_size, cfg.smax, per_batch=self.s_per_batch
        )
        fit_epochs(self.trainer, lambda epoch: self.train_dataset(task, epoch), initial_epoch, cfg.epochs,
                   [schedule, *callbacks])

    def end_task(self, task: TaskData) -> None:
        """Binarise the task's mask at smax, reserve it, and plan the growth that keeps
        the free capacity constant (applied when the next task begins)."""
        masks = [m.numpy() for m in self.generator.masks(task.index, self.config.smax)]
        self.reserved = update_reserved(self.reserved, masks)
        counts = [int(r.sum()) for r in self.reserved]
        newly = [c - p for c, p in zip(counts, self.reserved_counts)]
        self.reserved_counts = counts
        if self.mask_kind == "weight":
            self.pending_growth = growth_channels(newly, self.generator.widths, self.config.nz)
        else:
            self.pending_growth = activation_growth_channels(newly)
        sizes = [int(np.prod(r.shape)) for r in self.reserved]
        self.history.append(
            {
                "generator_params": self.generator.parameter_count(),
                "generator_widths": list(self.generator.widths),
                "newly_reserved": newly,
                "reserved_fraction": [c / s for c, s in zip(counts, sizes)],
                "task_mask_fraction": [float((m >= 0.5).mean()) for m in masks],
                # Share of mask values at smax still far from 0/1 (should be ~0).
                "task_mask_undecided_fraction": float(
                    np.mean(np.concatenate([((m > 0.01) & (m < 0.99)).ravel() for m in masks]))
                ),
                "growth_channels": list(self.pending_growth),
            }
        )

    # -- checkpoints ------------------------------------------------------------------

    def checkpoint_state(self, during_task: bool = True):
        """(JSON state, arrays, shared arrays) that ``restore_checkpoint`` rebuilds
        this method from, bit for bit: the grown generator's architecture and weights,
        the discriminator, reserved masks, growth plan, history and, during a task, the
        optimizers' slots, the trainer's RNG state and the task's replay set."""
        state = {
            "generator": None if self.generator is None else {
                "task_widths": [list(w) for w in self.generator.task_widths],
                "task_classes": [list(c) for c in self.generator.task_classes],
            },
            "num_seen": len(self._seen_labels),
            "seen_labels": list(self._seen_labels),
            "reserved_counts": list(self.reserved_counts),
            "pending_growth": list(self.pending_growth),
            "history": self.history,
            "num_reserved": 0 if self.reserved is None else len(self.reserved),
            "trainer_task": None if self.trainer is None or not during_task else self.trainer.task,
        }
        arrays = {}
        for prefix, model in (("generator", self.generator), ("discriminator", self.discriminator)):
            if model is not None:
                for i, v in enumerate(model.weights):
                    arrays[f"{prefix}/{i:04d}"] = v.numpy()
        for i, r in enumerate(self.reserved or []):
            arrays[f"reserved/{i}"] = np.asarray(r)
        shared = {}
        if self.trainer is not None and during_task:
            for prefix, opt in (("d_opt", self.trainer.d_optimizer), ("g_opt", self.trainer.g_optimizer)):
                for i, v in enumerate(opt.variables):
                    arrays[f"{prefix}/{i:04d}"] = v.numpy()
            arrays["rng_state"] = self.trainer.rng.state.numpy()
            if self.replay:
                key = f"replay_task_{self.trainer.task:03d}_{self._replay_digest()}"
                state["replay_key"] = key
                state["replay_sets"] = len(self.replay)
                shared[key] = {f"{kind}_{i}": arr for i, (x, y) in enumerate(self.replay)
                               for kind, arr in (("x", x), ("y", y))}
        return state, arrays, shared

    def _replay_digest(self) -> str:
        """Content digest of the replay set (computed once per replay set)."""
        if getattr(self, "_digest_of", None) is not self.replay:
            h = hashlib.sha256()
            for x, y in self.replay:
                h.update(np.ascontiguousarray(x).tobytes())
                h.update(np.ascontiguousarray(y).tobytes())
            self._digest_of, self._digest = self.replay, h.hexdigest()[:16]
        return self._digest

    def restore_checkpoint(self, state, arrays, shared, task: TaskData | None) -> None:
        """Rebuild from ``checkpoint_state``'s output. ``task``: the task being trained
        when the checkpoint was taken (mid-task), or None (taken after ``end_task``)."""

        def load(prefix, model):
            values = [arrays[f"{prefix}/{i:04d}"] for i in range(len(model.weights))]
            if f"{prefix}/{len(model.weights):04d}" in arrays:
                raise ValueError(f"checkpoint holds more {prefix} weights than the rebuilt network")
            for v, value in zip(model.weights, values):
                v.assign(value)

        g = state["generator"]
        self.generator = self._new_generator(g["task_widths"], g["task_classes"])
        load("generator", self.generator)
        self.discriminator = self._new_discriminator(state["num_seen"])
        load("discriminator", self.discriminator)
        self._seen_labels = list(state["seen_labels"])
        self.reserved_counts = list(state["reserved_counts"])
        self.pending_growth = tuple(state["pending_growth"])
        self.history = list(state["history"])
        n = state["num_reserved"]
        self.reserved = [arrays[f"reserved/{i}"] for i in range(n)] if n else None
        self.trainer = None
        self.replay = []
        if task is not None:
            if state.get("trainer_task") != task.index:
                raise ValueError(f"checkpoint was taken during task {state.get('trainer_task')}, not {task.index}")
            key = state.get("replay_key")
            if key:
                blob = shared[key]
                self.replay = [(blob[f"x_{i}"], blob[f"y_{i}"]) for i in range(state["replay_sets"])]
            self._make_trainer(task)
            for prefix, opt in (("d_opt", self.trainer.d_optimizer), ("g_opt", self.trainer.g_optimizer)):
                for i, v in enumerate(opt.variables):
                    v.assign(arrays[f"{prefix}/{i:04d}"])
            self.trainer.rng.reset(arrays["rng_state"])
        self._set_classifier()

    # -- inference ----------------------------------------------------------------------

    def classifier_logits(self, images: np.ndarray) -> np.ndarray:
        return self._classify(tf.convert_to_tensor(images, tf.float32)).numpy()

    def mask_values(self):
        s = float(self.trainer.s.numpy()) if self.trainer is not None else self.config.smax
        task = self.generator.num_tasks - 1
        return {conv.name: m.numpy() for conv, m in zip(self.generator.masked_convs, self.generator.masks(task, s))}

    def capacity(self):
        if not self.history:
            return {}
        last = self.history[-1]
        return {
            conv.name: {"reserved": r, "free": 1.0 - r, "task_used": u}
            for conv, r, u in zip(self.generator.masked_convs, last["reserved_fraction"], last["task_mask_fraction"])
        }

    def replay_examples(self, n):
        if not self.replay:
            return None
        per_task = max(1, n // len(self.replay))
        images = np.concatenate([x[:per_task] for x, _ in self.replay])
        labels = np.concatenate([y[:per_task] for _, y in self.replay])
        return images, labels

    def classifier_for_export(self):
        discriminator = self.discriminator
        return discriminator, lambda images: discriminator(images, training=False)[1]

    def classifier_weights(self) -> list[np.ndarray]:
        """The whole discriminator (trunk with its BN statistics, class head, critic
        head): the class head is the classifier, and with ``--noreinit_d`` the next task
        trains on from this network, so its critic stays the same epoch's. The generator
        is not part of it (it keeps its last epoch: the replay memory)."""
        return copy_weights(self.discriminator)

    def set_classifier_weights(self, weights) -> None:
        assign_weights(self.discriminator, weights)

    def generator_for_export(self):
        return self.generator, self.config.smax

    def sample(self, labels: np.ndarray, seed: int) -> np.ndarray:
        labels = np.asarray(labels, np.int32)
        out = np.zeros((len(labels),) + self.scenario.image_shape, np.float32)
        for t, classes in enumerate(self.generator.task_classes):
            idx = np.flatnonzero(np.isin(labels, classes))
            if len(idx):
                out[idx] = self.generate(labels[idx], task=t, seed=seed + t)
        return out

    def task_summary(self) -> dict:
        return dict(self.history[-1]) if self.history else {}


class DGMw(DGM):
    """DGM with weight masks: one embedding value per generator weight per task."""

    name = "dgmw"
    mask_kind = "weight"
    s_per_batch = True


class DGMa(DGM):
    """DGM with activation masks: one embedding value per output channel per task
    (reference: approaches/DGMa.py, networks/net_DGMa.py)."""

    name = "dgma"
    mask_kind = "activation"
    s_per_batch = False
