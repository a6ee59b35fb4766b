"""Batch normalisation with separate parameters and statistics for every task."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from dgm_tf.replica import replica_sum, replicas


@keras.saving.register_keras_serializable(package="dgm_tf")
class TaskBatchNormalization(keras.layers.Layer):
    """Batch normalisation over the channel axis, one set of parameters per task.

    Task ``t`` normalises the first ``task_filters[t]`` channels with its own gamma,
    beta and moving statistics, so training a later task never changes how an earlier
    task's generator normalises (the reference keeps a ``BatchNorm2d`` per task:
    SAP/machine-learning-dgm, networks/net_DGMw.py, ``BatchNorms1..3``).

    Moving statistics follow PyTorch's ``BatchNorm2d`` as the reference uses it: the
    moving variance is updated with the *unbiased* batch variance, normalisation in
    training uses the biased one; ``momentum=0.9`` here equals PyTorch's 0.1.

    Args:
        task_filters: Channels of each task (one entry per task).
        momentum: Keras-convention momentum of the moving statistics.
        epsilon: Added to the variance.
        gamma_initializer: Initializer of the scale of tasks this layer creates.
        dtype: Keras dtype policy. Statistics and normalisation are computed in float32
            whatever the policy; the output has the policy's compute dtype.

    Reference:
        Ioffe & Szegedy, ICML 2015; Ostapenko et al., CVPR 2019.
    """

    def __init__(
        self,
        task_filters: Sequence[int],
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        gamma_initializer="ones",
        **kwargs,
    ):
        kwargs["autocast"] = False  # statistics in float32, see call()
        super().__init__(**kwargs)
        self.task_filters = tuple(int(f) for f in task_filters)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)

    @property
    def num_tasks(self) -> int:
        return len(self.task_filters)

    def build(self, input_shape):
        # Canonical variable order: task by task, (gamma, beta, mean, variance).
        self.gammas, self.betas, self.moving_means, self.moving_variances = [], [], [], []
        for t, width in enumerate(self.task_filters):
            self.gammas.append(
                self.add_weight(name=f"gamma_{t}", shape=(width,), initializer=self.gamma_initializer)
            )
            self.betas.append(self.add_weight(name=f"beta_{t}", shape=(width,), initializer="zeros"))
            self.moving_means.append(
                self.add_weight(
                    name=f"moving_mean_{t}", shape=(width,), initializer="zeros", trainable=False
                )
            )
            self.moving_variances.append(
                self.add_weight(
                    name=f"moving_variance_{t}", shape=(width,), initializer="ones", trainable=False
                )
            )

    def task_variables(self, task: int) -> list:
        """The trainable variables of one task."""
        return [self.gammas[task], self.betas[task]]

    def call(self, inputs, task: int, training=None):
        gamma, beta = self.gammas[task], self.betas[task]
        inputs = tf.cast(inputs, tf.float32)
        if training:
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
            if replicas() > 1:
                # The global batch's moments (each replica holds a share of it), so N
                # replicas normalise and update the moving statistics as one device;
                # chosen at trace time, one device keeps the plain op.
                mean, variance = keras.ops.moments(inputs, axes=[0, 1, 2], synchronized=True)
                count = replica_sum(count)
            else:
                mean, variance = tf.nn.moments(inputs, axes=[0, 1, 2])
            unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
            m = self.momentum
            self.moving_means[task].assign(self.moving_means[task] * m + mean * (1.0 - m))
            self.moving_variances[task].assign(
                self.moving_variances[task] * m + unbiased * (1.0 - m)
            )
        else:
            mean, variance = self.moving_means[task], self.moving_variances[task]
        outputs = tf.nn.batch_normalization(inputs, mean, variance, beta, gamma, self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            task_filters=list(self.task_filters),
            momentum=self.momentum,
            epsilon=self.epsilon,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
        )
        return config

    def load_grown_weights(self, old: "TaskBatchNormalization") -> None:
        """Copy every task of ``old`` (same widths) into this layer."""
        if self.task_filters[: old.num_tasks] != old.task_filters:
            raise ValueError(
                f"task widths {old.task_filters} are not a prefix of {self.task_filters}"
            )
        for t in range(old.num_tasks):
            self.gammas[t].assign(old.gammas[t])
            self.betas[t].assign(old.betas[t])
            self.moving_means[t].assign(old.moving_means[t])
            self.moving_variances[t].assign(old.moving_variances[t])
