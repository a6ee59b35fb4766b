"""Loss scaling for ``--precision=mixed_float16`` (issue 23).

float16 keeps 5 exponent bits: gradients below 6e-8 flush to zero and above 65504
overflow. Keras's ``LossScaleOptimizer`` multiplies the loss by a dynamic scale before
the backward pass and divides the gradients by it before the update; a step whose
gradients are not finite is skipped and the scale halved, and after
``dynamic_growth_steps`` finite steps it doubles (Micikevicius et al., ICLR 2018,
"Mixed precision training"). This is the usual choice on GPUs without bfloat16.

Every trainer of ours computes its own gradients in ``train_step``, so it must scale
its loss itself: ``scaled_loss(optimizer, loss)`` before ``tape.gradient`` and
``loss_scale(optimizer)`` wherever it transforms the still-scaled gradients
(DGM's generator clips them: clipping at ``clip_norm * scale`` is clipping the true
gradient at ``clip_norm``, scaled). Masks, s, the BN statistics and both heads stay
float32 under the policy (the layers compute them in float32, as under bfloat16).
With any other precision the helpers return their input unchanged.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dgm_tf.replica import replica_sum, replicas

LOSS_SCALED_PRECISIONS = ("mixed_float16",)


def maybe_loss_scaled(optimizer: keras.optimizers.Optimizer, precision: str) -> keras.optimizers.Optimizer:
    """``optimizer`` wrapped in a dynamic ``LossScaleOptimizer`` where ``precision``
    needs one (Keras's defaults: initial scale 2^15, growth every 2000 finite steps)."""
    if precision in LOSS_SCALED_PRECISIONS:
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def is_loss_scaled(optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def loss_scale(optimizer) -> tf.Tensor | float:
    """The factor the optimizer's gradients carry (1.0 without loss scaling)."""
    if is_loss_scaled(optimizer):
        return tf.cast(tf.convert_to_tensor(optimizer.dynamic_scale), tf.float32)
    return 1.0


def scaled_loss(optimizer, loss):
    """``loss`` times the optimizer's current scale (unchanged without loss scaling)."""
    if is_loss_scaled(optimizer):
        return optimizer.scale_loss(loss)
    return loss


def agree_on_overflow(optimizer, grads):
    """Under loss scaling on several replicas: every replica's gradients made non-finite
    when any replica's are. Keras's ``LossScaleOptimizer`` decides to skip a step from
    the first replica's own gradients, before the sum over replicas, so a share that
    overflowed elsewhere would reach the weights (MirroredStrategy), or the workers
    would disagree on entering the all-reduce and hang (MultiWorkerMirroredStrategy).
    ``grads`` unchanged, no op added, on one replica or without loss scaling."""
    if not is_loss_scaled(optimizer) or replicas() == 1:
        return grads
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
    overflowed = replica_sum(1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(overflowed > 0, float("nan"), 0.0)
    return [None if g is None else g + tf.cast(poison, g.dtype) for g in grads]
