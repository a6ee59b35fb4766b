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
