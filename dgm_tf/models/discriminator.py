"""The DGM discriminator: a WGAN critic and the continual classifier on one trunk."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dgm_tf.layers.replica_batch_norm import ReplicaBatchNormalization


def torch_default_dense_initializers():
    """PyTorch's default nn.Linear init: kernel and bias U(+-1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


@keras.saving.register_keras_serializable(package="dgm_tf")
class TorchDefaultBias(keras.initializers.Initializer):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a Dense bias, as nn.Linear does."""

    def __init__(self, fan_in: int):
        self.fan_in = int(fan_in)

    def __call__(self, shape, dtype=None):
        bound = 1.0 / np.sqrt(self.fan_in)
        return keras.random.uniform(shape, -bound, bound, dtype=dtype)

    def get_config(self):
        return {"fan_in": self.fan_in}


def apply_trunk(layers, images, training=None, whole_batch=False):
    """Run ``layers`` in order; BatchNormalization layers get the ``training`` flag (and
    ``whole_batch``, see ``ReplicaBatchNormalization``)."""
    x = images
    for layer in layers:
        if isinstance(layer, ReplicaBatchNormalization):
            x = layer(x, training=training, whole_batch=whole_batch)
        elif isinstance(layer, keras.layers.BatchNormalization):
            x = layer(x, training=training)
        else:
            x = layer(x)
    return x


def copy_into_wider_head(new_head: keras.layers.Dense, old_head: keras.layers.Dense) -> None:
    """Copy ``old_head``'s class rows (kernel columns and biases) into the leading rows
    of the wider ``new_head``; its extra rows keep their fresh initialisation."""
    kernel, bias = (v.numpy() for v in new_head.weights)
    old_kernel, old_bias = (v.numpy() for v in old_head.weights)
    n = old_kernel.shape[1]
    kernel[:, :n] = old_kernel
    bias[:n] = old_bias
    new_head.set_weights([kernel, bias])


def copy_into_wider_model(new: keras.Model, old: keras.Model, new_head: keras.layers.Dense,
                          old_head: keras.layers.Dense) -> None:
    """Copy every variable of ``old`` but its class head into ``new`` (the same network
    with a wider ``new_head``: variables in the same order, with the same paths), then the
    head's class rows (``copy_into_wider_head``)."""
    head, wider = {id(v) for v in old_head.weights}, {id(v) for v in new_head.weights}
    old_vars = [v for v in old.weights if id(v) not in head]
    new_vars = [v for v in new.weights if id(v) not in wider]
    if [v.path for v in old_vars] != [v.path for v in new_vars]:
        raise RuntimeError(f"{type(old).__name__}.with_classes: the copies' variables differ")
    for target, source in zip(new_vars, old_vars):
        target.assign(source)
    copy_into_wider_head(new_head, old_head)


@keras.saving.register_keras_serializable(package="dgm_tf")
class Discriminator(keras.Model):
    """ACGAN discriminator/classifier for 32x32 images.

    conv 5x5/2 (ndf) -> LeakyReLU(0.2) -> conv 5x5/2 (2·ndf) -> BN -> LeakyReLU ->
    conv 5x5/2 (4·ndf) -> BN -> LeakyReLU -> flatten -> two linear heads: the critic
    (one output) and the auxiliary classifier (one logit per class seen so far). The
    auxiliary head is the continual classifier that gets exported.

    Convolutions have no bias and pad 2 pixels on every side, as PyTorch's
    ``Conv2d(..., 5, 2, 2)`` does; weights N(0, 0.02), BN gamma N(1, 0.02); linear
    heads use PyTorch's default initialisation (reference: networks/net_DGMw.py
    ``netD`` and utils/utils.py ``weights_init``).

    Args:
        ndf: Width of the first convolution.
        num_classes: Logits of the auxiliary head.
        image_channels: Input channels.
        image_size: Input height and width (32).
        dtype: Keras dtype policy for the trunk (``"float32"`` or ``"mixed_bfloat16"``).
            The two linear heads always compute in float32 (bf16 logits keep only ~3
            significant digits) and both outputs are float32.

    Call returns ``(critic [N], logits [N, num_classes])``, float32.
    """

    def __init__(self, ndf: int, num_classes: int, image_channels: int, image_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.ndf = int(ndf)
        self.num_classes = int(num_classes)
        self.image_channels = int(image_channels)
        self.image_size = int(image_size)
        conv_init = keras.initializers.RandomNormal(0.0, 0.02)
        self.trunk = []
        for i, width in enumerate((self.ndf, 2 * self.ndf, 4 * self.ndf)):
            self.trunk.append(keras.layers.ZeroPadding2D(2, name=f"pad{i + 1}", dtype=self.dtype_policy))
            self.trunk.append(
                keras.layers.Conv2D(
                    width,
                    5,
                    strides=2,
                    use_bias=False,
                    kernel_initializer=conv_init,
                    name=f"conv{i + 1}",
                    dtype=self.dtype_policy,
                )
            )
            if i > 0:
                # PyTorch BatchNorm2d(momentum=0.1, eps=1e-5) == Keras momentum 0.9.
                self.trunk.append(
                    ReplicaBatchNormalization(
                        momentum=0.9,
                        epsilon=1e-5,
                        gamma_initializer=keras.initializers.RandomNormal(1.0, 0.02),
                        name=f"bn{i + 1}",
                        dtype=self.dtype_policy,
                    )
                )
            self.trunk.append(
                keras.layers.LeakyReLU(negative_slope=0.2, name=f"lrelu{i + 1}", dtype=self.dtype_policy)
            )
        self.flatten = keras.layers.Flatten(name="flatten", dtype=self.dtype_policy)
        spatial = self.image_size // 8
        features = 4 * self.ndf * spatial * spatial
        self.critic_head = keras.layers.Dense(
            1,
            kernel_initializer=torch_default_dense_initializers(),
            bias_initializer=TorchDefaultBias(features),
            name="critic",
            dtype="float32",
        )
        self.class_head = keras.layers.Dense(
            self.num_classes,
            kernel_initializer=torch_default_dense_initializers(),
            bias_initializer=TorchDefaultBias(features),
            name="classifier",
            dtype="float32",
        )
        self.build((None, self.image_size, self.image_size, self.image_channels))

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.trunk:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        # Flatten has no weights, but an unbuilt layer makes Keras try a symbolic build
        # of the whole model when fit() runs under a tf.distribute strategy.
        self.flatten.build(shape)
        shape = self.flatten.compute_output_shape(shape)
        self.critic_head.build(shape)
        self.class_head.build(shape)
        self.built = True

    def features(self, images, training=None, whole_batch=False):
        return self.flatten(apply_trunk(self.trunk, images, training, whole_batch))

    def call(self, images, training=None, whole_batch=False):
        """``(critic [N], class logits [N, classes])``; ``whole_batch``: the images are
        the whole global batch on every replica (``ReplicaBatchNormalization``)."""
        h = self.features(images, training=training, whole_batch=whole_batch)
        critic = tf.reshape(self.critic_head(h), [-1])
        return critic, self.class_head(h)

    def get_config(self):
        return {
            "name": self.name,
            "ndf": self.ndf,
            "num_classes": self.num_classes,
            "image_channels": self.image_channels,
            "image_size": self.image_size,
            "dtype": self.dtype_policy.name,
        }

    def with_classes(self, num_classes: int) -> "Discriminator":
        """A copy with a wider auxiliary head; trunk, critic and old class rows copied."""
        if num_classes < self.num_classes:
            raise ValueError("the auxiliary head never shrinks")
        new = Discriminator(
            self.ndf, num_classes, self.image_channels, self.image_size, name=self.name,
            dtype=self.dtype_policy.name,
        )
        for layer_new, layer_old in zip(new.trunk + [new.critic_head], self.trunk + [self.critic_head]):
            layer_new.set_weights(layer_old.get_weights())
        copy_into_wider_head(new.class_head, self.class_head)
        return new
