"""Per-class output transposed convolutions of the generator."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf


def torch_default_conv_transpose_initializer():
    """PyTorch's default ConvTranspose2d init (kaiming_uniform, a=sqrt(5)).

    Bound 1/sqrt(fan_in) with PyTorch's fan_in of a transposed kernel
    (out_channels * k * k), which is Keras's fan_in of the (k, k, out, in) layout too.
    The reference creates its per-class heads with this default
    (SAP/machine-learning-dgm, approaches/DGMw.py: ``netG.last.append(...)``).
    """
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


@keras.saving.register_keras_serializable(package="dgm_tf")
class ClassOutputHeads(keras.layers.Layer):
    """One unmasked 4x4 stride-2 transposed convolution per class (no bias).

    The generator of DGMa uses one head per *task* instead: it builds this layer with one
    entry per task and calls it with ``classes=(task,)`` (``Generator.head_per_task``).

    Class ``c``'s head reads the ``class_input_channels[c]`` channels its task had, so
    heads of earlier classes stay valid after the trunk grows. ``call`` computes the
    heads of the given classes and picks, per sample, the head of its label.

    Args:
        class_input_channels: Input channels of each class's head, indexed by model
            label (labels are registered in order 0, 1, 2, ...).
        image_channels: Output channels (1 for grayscale, 3 for RGB).
        kernel_size: Square kernel size (4 in the reference).
        strides: Stride (2 in the reference: 16x16 -> 32x32).
        dtype: Keras dtype policy; kernels are stored in its variable dtype and the
            convolutions run in its compute dtype.

    Reference:
        SAP/machine-learning-dgm, networks/net_DGMw.py (``netG.last``).
    """

    def __init__(
        self,
        class_input_channels: Sequence[int],
        image_channels: int,
        kernel_size: int = 4,
        strides: int = 2,
        **kwargs,
    ):
        kwargs["autocast"] = False  # casts are explicit in call()
        super().__init__(**kwargs)
        self.class_input_channels = tuple(int(c) for c in class_input_channels)
        self.image_channels = int(image_channels)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)

    @property
    def num_classes(self) -> int:
        return len(self.class_input_channels)

    def build(self, input_shape):
        k = self.kernel_size
        self.kernels = [
            self.add_weight(
                name=f"kernel_{c}",
                shape=(k, k, self.image_channels, width),
                initializer=torch_default_conv_transpose_initializer(),
            )
            for c, width in enumerate(self.class_input_channels)
        ]

    def call(self, inputs, labels, classes: Sequence[int]):
        """Images of ``labels`` from the heads of ``classes`` (the task's classes).

        A label outside ``classes`` gets an all-zero pre-activation.
        """
        classes = tuple(classes)
        inputs = tf.cast(inputs, self.compute_dtype)
        outputs = [
            keras.ops.conv_transpose(
                inputs,
                tf.cast(self.kernels[c], self.compute_dtype),
                strides=self.strides,
                padding="same",
            )
            for c in classes
        ]
        if len(classes) == 1:
            return outputs[0]
        stacked = tf.stack(outputs, axis=1)  # [N, classes, H, W, C]
        select = tf.cast(
            tf.equal(tf.reshape(labels, [-1, 1]), tf.constant(classes, dtype=labels.dtype)),
            stacked.dtype,
        )
        return tf.einsum("nkhwc,nk->nhwc", stacked, select)

    def get_config(self):
        config = super().get_config()
        config.update(
            class_input_channels=list(self.class_input_channels),
            image_channels=self.image_channels,
            kernel_size=self.kernel_size,
            strides=self.strides,
        )
        return config

    def load_grown_weights(self, old: "ClassOutputHeads") -> None:
        """Copy the heads of every class ``old`` has; new classes keep fresh weights."""
        if self.class_input_channels[: old.num_classes] != old.class_input_channels:
            raise ValueError("old heads are not a prefix of the new ones")
        for c in range(old.num_classes):
            self.kernels[c].assign(old.kernels[c])
