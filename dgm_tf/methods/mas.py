"""Memory Aware Synapses: parameter importance and the penalty as pure functions, and
the ``MAS`` method (``--method=mas``) built on them.

Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars: "Memory Aware Synapses: Learning
what (not) to forget", ECCV 2018 (arXiv:1711.09601).

Where we follow the paper and where we deviate:

* Importance (paper Eq. 2 with the squared-L2 output function of Eq. 4): for every
  parameter theta_ij, Omega_ij = 1/N sum_k |g_ij(x_k)|, g_ij(x_k) = d l2^2(F(x_k)) /
  d theta_ij. We compute g **per sample** (one gradient per image), as the paper
  defines it. The authors' code (rahafaljundi/MAS-Memory-Aware-Synapses,
  MAS_utils/MAS_based_Training.py ``compute_importance_l2``) takes |.| of the gradient
  of the *batch sum*, in which samples' gradients of opposite sign cancel, unless run
  with batch size 1 (its ``b1`` option, "to mimic online importance"); we compute what
  ``b1`` computes.
* F is the network's logit output (pre-softmax), as in the authors' code. In our
  class-incremental single-head setting F(x) has one logit per class seen so far, so
  ||F(x)||^2 runs over all seen classes' logits at the end of the task (the paper's
  experiments are multi-head, where F is the task's own head). The network is in
  inference mode (BatchNorm uses its moving statistics), as the authors' code
  (``model.eval()``); per-sample gradients need that anyway, since training-mode
  BatchNorm couples the samples of a batch.
* The data are the task's training images at the end of the task (the paper allows
  any unlabelled data; its experiments use the training data).
* Accumulation over tasks (the paper accumulates Omega along the sequence; the
  authors' code sums the omegas, ``accumelate_reg_params``): Omega after task t =
  Omega after task t-1 + the importance measured on task t.
* Penalty (paper Eq. 3): ``lambda * sum_ij Omega_ij (theta_ij - theta*_ij)^2``, theta*
  the parameters at the end of the previous task (the authors' optimiser adds its
  gradient ``2 lambda Omega (theta - theta*)``; their object-recognition runs use
  lambda = 1). Parameters that did not exist then (the new class rows of the growing
  head) have Omega = 0, so no penalty.
* The penalty covers the trainable parameters only (BatchNorm's moving statistics are
  not parameters); the optimiser is Adam, as DGM's classifier uses (the paper used SGD).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from dgm_tf.config import Config
from dgm_tf.data import Scenario, TaskData
from dgm_tf.methods.classifier_base import ClassifierBaseline
from dgm_tf.models.classifier import classifier_variables, network_logits
from dgm_tf.replica import per_replica

DEFAULT_IMPORTANCE_BATCH = 256


def per_sample_abs_output_gradients(
    logits_fn: Callable[[tf.Tensor], tf.Tensor], variables: Sequence[tf.Variable], images: tf.Tensor
) -> list[tf.Tensor]:
    """Sum over the samples x_k of |d ||logits_fn(x_k)||^2 / d theta|, one float32 tensor
    per variable.

    Each sample's gradient is taken on its own (a ``tf.while_loop`` over batches of one,
    accumulating the absolute values), never as the gradient of the batch sum.
    ``logits_fn`` must treat samples independently (inference mode). A batched
    Jacobian (``tape.jacobian`` with pfor, or ``tf.vectorized_map``) gives the same
    numbers (tests/test_baselines.py compares them) but measured 30-60x slower here on
    CPU: 8.8 s instead of 0.27 s for 512 images on the discriminator trunk (ndf 16),
    110 s instead of 1.9 s on the CNN classifier.
    """
    variables = list(variables)

    def body(i, totals):
        with tf.GradientTape() as tape:
            logits = tf.cast(logits_fn(images[i : i + 1]), tf.float32)
            squared_norm = tf.reduce_sum(tf.square(logits))
        grads = tape.gradient(squared_norm, variables)
        return i + 1, [
            t if g is None else t + tf.abs(tf.cast(g, tf.float32)) for t, g in zip(totals, grads)
        ]

    start = [tf.zeros(v.shape, tf.float32) for v in variables]
    _, totals = tf.while_loop(lambda i, _: i < tf.shape(images)[0], body, [tf.constant(0), start])
    return totals


def mas_importance(
    logits_fn: Callable[[tf.Tensor], tf.Tensor],
    variables: Sequence[tf.Variable],
    images: np.ndarray,
    batch_size: int = DEFAULT_IMPORTANCE_BATCH,
) -> list[np.ndarray]:
    """Omega of one task: mean over ``images`` of the per-sample absolute gradient of the
    squared L2 norm of the logits, one float32 array per variable (shapes of
    ``variables``). See the module docstring for the paper's definition.

    Args:
        logits_fn: images -> logits, in inference mode (samples independent).
        variables: The parameters to measure.
        images: float32 ``[N, ...]``, N >= 1.
        batch_size: Images per call of the compiled loop (bounds host-to-graph copies).
    """
    images = np.asarray(images, np.float32)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"MAS importance needs a batch of at least one image, got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    variables = list(variables)
    # One trace for every batch size (the last batch is smaller).
    step = tf.function(
        lambda x: per_sample_abs_output_gradients(logits_fn, variables, x),
        input_signature=[tf.TensorSpec((None,) + images.shape[1:], tf.float32)],
    )
    totals = [np.zeros(v.shape, np.float64) for v in variables]
    for start in range(0, len(images), batch_size):
        sums = per_replica(step, tf.constant(images[start : start + batch_size]))
        for total, s in zip(totals, sums):
            total += s.numpy()
    return [(t / len(images)).astype(np.float32) for t in totals]


def pad_like(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Zero-pad each array at the end of every axis to ``shapes`` (the grown class head's
    new rows get Omega = 0 and theta* = 0; with Omega = 0 theta* is irrelevant)."""
    if len(arrays) != len(shapes):
        raise ValueError(f"{len(arrays)} arrays for {len(shapes)} shapes")
    out = []
    for a, shape in zip(arrays, shapes):
        a = np.asarray(a)
        if a.ndim != len(shape) or any(int(n) < int(o) for n, o in zip(shape, a.shape)):
            raise ValueError(f"cannot pad shape {a.shape} to {tuple(shape)}")
        out.append(np.pad(a, [(0, int(n) - int(o)) for n, o in zip(shape, a.shape)]))
    return out


def accumulate_importance(previous: Sequence[np.ndarray] | None, new: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Omega after this task: the earlier tasks' Omega (zero-padded to the current
    parameter shapes) plus this task's importance."""
    new = [np.asarray(n, np.float32) for n in new]
    if previous is None:
        return new
    padded = pad_like(previous, [n.shape for n in new])
    return [p + n for p, n in zip(padded, new)]


def mas_penalty(
    variables: Sequence[tf.Variable | tf.Tensor],
    omega: Sequence[tf.Tensor | np.ndarray],
    theta_star: Sequence[tf.Tensor | np.ndarray],
    mas_lambda: float,
) -> tf.Tensor:
    """``mas_lambda * sum_i sum(Omega_i * (theta_i - theta*_i)^2)`` (paper Eq. 3), float32
    scalar; exactly zero at theta = theta*, quadratic in the distance."""
    if not (len(variables) == len(omega) == len(theta_star)):
        raise ValueError(f"{len(variables)} variables, {len(omega)} omegas, {len(theta_star)} theta*")
    terms = [
        tf.reduce_sum(tf.cast(o, tf.float32) * tf.square(tf.cast(v, tf.float32) - tf.cast(s, tf.float32)))
        for v, o, s in zip(variables, omega, theta_star)
    ]
    total = tf.add_n(terms) if terms else tf.constant(0.0)
    return tf.constant(float(mas_lambda), tf.float32) * total


class MAS(ClassifierBaseline):
    """Memory Aware Synapses (Aljundi et al., ECCV 2018) on a single growing head.

    After task t: Omega += importance on task t's training data, theta* = the
    parameters now. While training task t+1 the loss is the cross-entropy plus
    ``mas_lambda * sum(Omega * (theta - theta*)^2)``; the head's new rows have
    Omega = 0. ``dgm_tf.methods.mas`` documents where we follow and deviate from the
    paper.
    """

    name = "mas"

    def __init__(self, config: Config, scenario: Scenario):
        super().__init__(config, scenario)
        self.omega: list[np.ndarray] | None = None
        self.theta_star: list[np.ndarray] | None = None

    def head_grown(self) -> None:
        if self.omega is not None:
            shapes = [tuple(v.shape) for v in classifier_variables(self.network)]
            self.omega = pad_like(self.omega, shapes)
            self.theta_star = pad_like(self.theta_star, shapes)

    def penalty_fn(self):
        if self.omega is None:  # first task: nothing to protect
            return None
        variables = classifier_variables(self.network)
        omega = [tf.constant(o) for o in self.omega]
        theta_star = [tf.constant(s) for s in self.theta_star]
        mas_lambda = self.config.mas_lambda
        return lambda: mas_penalty(variables, omega, theta_star, mas_lambda)

    def penalty_now(self) -> float:
        """The penalty at the current parameters (0 before the first task ends)."""
        if self.omega is None:
            return 0.0
        variables = classifier_variables(self.network)
        return float(mas_penalty(variables, self.omega, self.theta_star, self.config.mas_lambda))

    def consolidate(self, task: TaskData) -> dict:
        network = self.network
        variables = classifier_variables(network)
        penalty_at_end = self.penalty_now()
        importance = mas_importance(lambda x: network_logits(network, x, training=False), variables, task.x_train)
        self.omega = accumulate_importance(self.omega, importance)
        self.theta_star = [v.numpy().astype(np.float32) for v in variables]
        flat = np.concatenate([o.ravel() for o in self.omega])
        return {
            # lambda * sum(Omega (theta - theta*)^2) at the end of this task (earlier Omega).
            "mas_penalty_end": penalty_at_end,
            "mas_task_importance_mean": float(np.mean(np.concatenate([i.ravel() for i in importance]))),
            "mas_omega_mean": float(flat.mean()),
            "mas_omega_max": float(flat.max()),
        }

    def extra_state(self, during_task):
        arrays = {}
        for i, (o, s) in enumerate(zip(self.omega or [], self.theta_star or [])):
            arrays[f"mas/omega/{i:04d}"] = o
            arrays[f"mas/theta_star/{i:04d}"] = s
        return {"mas_arrays": 0 if self.omega is None else len(self.omega)}, arrays, {}

    def restore_extra(self, state, arrays, shared):
        n = state["mas_arrays"]
        if n:
            self.omega = [arrays[f"mas/omega/{i:04d}"] for i in range(n)]
            self.theta_star = [arrays[f"mas/theta_star/{i:04d}"] for i in range(n)]
        else:
            self.omega = self.theta_star = None
