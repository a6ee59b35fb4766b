"""The comparison methods' classifier networks (``--classifier``): ``dgm`` is DGM's
``Discriminator`` (its auxiliary class head is the classifier), ``cnn`` the larger
``CNNClassifier`` below; ``build_classifier``, ``network_logits`` and
``classifier_variables`` hide which one a method trains."""

from __future__ import annotations

import keras

from dgm_tf.config import ConfigError
from dgm_tf.layers.replica_batch_norm import ReplicaBatchNormalization
from dgm_tf.models.discriminator import (
    Discriminator,
    TorchDefaultBias,
    apply_trunk,
    copy_into_wider_head,
    torch_default_dense_initializers,
)


@keras.saving.register_keras_serializable(package="dgm_tf")
class CNNClassifier(keras.Model):
    """VGG-style CNN for 32x32 images, for the comparison methods.

    Four blocks of two 3x3 convolutions (no bias) -> BN -> ReLU, widths ndf, 2·ndf,
    4·ndf, 8·ndf; 2x2 max pooling after the first three blocks (32 -> 16 -> 8 -> 4),
    global average pooling, one linear class head with a logit per class seen so far.
    About 7.5x the multiply-adds of DGM's discriminator trunk at the same ndf and 4.5x
    its parameters; it tells whether a comparison method is limited by DGM's small
    classifier.

    Convolutions use He-normal weights (ReLU), BN is PyTorch-like (momentum 0.1, eps
    1e-5); the head uses PyTorch's default linear initialisation as the
    discriminator's heads do.

    Args:
        ndf: Width of the first block.
        num_classes: Logits of the class head.
        image_channels: Input channels.
        image_size: Input height and width (divisible by 8).
        dtype: Keras dtype policy for the convolutions; the head computes in float32
            and the logits are float32.

    Call returns logits ``[N, num_classes]``, float32.

    Example:
        >>> net = CNNClassifier(16, num_classes=2, image_channels=1)
        >>> wider = net.with_classes(4)  # old rows copied, two new ones
    """

    BLOCKS = 4
    CONVS_PER_BLOCK = 2

    def __init__(self, ndf: int, num_classes: int, image_channels: int, image_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        if int(image_size) % 8:
            raise ValueError(f"image_size must be divisible by 8, got {image_size}")
        if int(num_classes) < 1 or int(ndf) < 1:
            raise ValueError(f"ndf and num_classes must be >= 1, got {ndf} and {num_classes}")
        self.ndf = int(ndf)
        self.num_classes = int(num_classes)
        self.image_channels = int(image_channels)
        self.image_size = int(image_size)
        self.trunk = []
        for block in range(self.BLOCKS):
            width = self.ndf * 2**block
            for j in range(self.CONVS_PER_BLOCK):
                name = f"block{block + 1}_conv{j + 1}"
                self.trunk.append(
                    keras.layers.Conv2D(
                        width, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                        name=name, dtype=self.dtype_policy,
                    )
                )
                self.trunk.append(
                    ReplicaBatchNormalization(
                        momentum=0.9, epsilon=1e-5, name=f"{name}_bn", dtype=self.dtype_policy
                    )
                )
                self.trunk.append(keras.layers.ReLU(name=f"{name}_relu", dtype=self.dtype_policy))
            if block < self.BLOCKS - 1:
                self.trunk.append(keras.layers.MaxPooling2D(2, name=f"pool{block + 1}", dtype=self.dtype_policy))
        self.pool = keras.layers.GlobalAveragePooling2D(name="global_pool", dtype=self.dtype_policy)
        features = self.ndf * 2 ** (self.BLOCKS - 1)
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
        self.pool.build(shape)  # as Discriminator.build: no layer left unbuilt
        shape = self.pool.compute_output_shape(shape)
        self.class_head.build(shape)
        self.built = True

    def features(self, images, training=None):
        return self.pool(apply_trunk(self.trunk, images, training))

    def call(self, images, training=None):
        return self.class_head(self.features(images, training=training))

    def get_config(self):
        return {
            "name": self.name,
            "ndf": self.ndf,
            "num_classes": self.num_classes,
            "image_channels": self.image_channels,
            "image_size": self.image_size,
            "dtype": self.dtype_policy.name,
        }

    def with_classes(self, num_classes: int) -> "CNNClassifier":
        """A copy with a wider class head: trunk and old class rows copied, the new rows
        freshly initialised (from Keras's global RNG)."""
        if num_classes < self.num_classes:
            raise ValueError(f"the class head never shrinks ({self.num_classes} -> {num_classes})")
        new = CNNClassifier(
            self.ndf, num_classes, self.image_channels, self.image_size, name=self.name,
            dtype=self.dtype_policy.name,
        )
        for layer_new, layer_old in zip(new.trunk, self.trunk):
            layer_new.set_weights(layer_old.get_weights())
        copy_into_wider_head(new.class_head, self.class_head)
        return new


def build_classifier(kind: str, ndf: int, num_classes: int, image_channels: int, image_size: int = 32,
                     dtype: str = "float32") -> keras.Model:
    """A fresh classifier network: ``dgm`` (DGM's discriminator) or ``cnn``."""
    if kind == "dgm":
        return Discriminator(ndf, num_classes, image_channels, image_size, name="classifier", dtype=dtype)
    if kind == "cnn":
        return CNNClassifier(ndf, num_classes, image_channels, image_size, name="classifier", dtype=dtype)
    raise ConfigError(f"--classifier: unknown classifier {kind!r}; choose dgm or cnn")


def network_logits(network: keras.Model, images, training: bool):
    """Logits over the seen classes (float32); the discriminator's critic output is dropped."""
    out = network(images, training=training)
    return out[1] if isinstance(network, Discriminator) else out


def classifier_variables(network: keras.Model) -> list:
    """The trainable parameters the logits depend on (the discriminator's critic head excluded)."""
    if isinstance(network, Discriminator):
        critic = {id(v) for v in network.critic_head.weights}
        return [v for v in network.trainable_variables if id(v) not in critic]
    return list(network.trainable_variables)
