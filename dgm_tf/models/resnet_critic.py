"""The reference's ImageNet discriminator: a ResNet-18 trunk under the critic and the
continual classifier (``--critic=resnet18``).

The reference (SAP/machine-learning-dgm, networks/net_DGMw_imnet.py ``netD`` on
networks/resnet.py ``resnet18``, built by run_DGMw_imagenet.py as ``netD(2048, ...)``):

- the CIFAR-style ResNet-18 at 32x32: conv 3x3 (64, no bias) + BN + ReLU; four stages of
  two basic blocks (64, 128, 256, 512 channels; stride 2 at the first block of stages
  2-4, whose shortcut is a 1x1 convolution + BN); average pooling over the final 4x4;
- its ``fc`` replaced by Linear(512 -> 2048), then BatchNorm1d(2048, momentum 0.01) and
  ReLU: the 2048 features both heads read;
- the critic Linear(2048 -> 1) and the auxiliary classifier Linear(2048 -> classes).

BatchNorm as the reference has it: every BN in training mode during the critic's and
the gradient penalty's forward passes (PyTorch's momentum 0.1 is Keras's 0.9, the
features' 0.01 is 0.99; epsilon 1e-5). The layers are ``ReplicaBatchNormalization``,
so under several replicas the moments are the global batch's, and the gradient
penalty's pass may run on the whole batch per replica (``whole_batch``), as for the
DCGAN critic. Weights start from PyTorch's defaults (the reference initialises none of
these layers; ``--reinit_d`` rebuilds the critic with fresh defaults).

Deviation: the reference's first task has a class head without bias and each later
task a new head with a bias, initialised afresh, into which only the old weight rows
are copied (approaches/DGMw_imnet.py). Here the class head has a bias from the start
and growth copies old rows and biases, as every other class head of ours does.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from dgm_tf.layers.gating import torch_default_bias_initializer, torch_default_kernel_initializer
from dgm_tf.layers.replica_batch_norm import ReplicaBatchNormalization
from dgm_tf.models.discriminator import copy_into_wider_model

FEATURES = 2048  # run_DGMw_imagenet.py: model.netD(2048, ...)
STAGES = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2  # resnet18(): ResNet(BasicBlock, [2, 2, 2, 2])
# PyTorch BatchNorm momentum 0.1 (trunk) and 0.01 (features) as Keras momentum.
TRUNK_BN_MOMENTUM = 0.9
FEATURE_BN_MOMENTUM = 0.99
BN_EPSILON = 1e-5


def _bn(name: str, momentum: float, dtype) -> ReplicaBatchNormalization:
    return ReplicaBatchNormalization(momentum=momentum, epsilon=BN_EPSILON, name=name, dtype=dtype)


def _conv(filters: int, size: int, stride: int, name: str, dtype) -> keras.layers.Conv2D:
    # PyTorch's padding=1 on a 3x3 kernel is Keras's "same" at stride 1; at stride 2 on
    # an even input "same" pads only at the end, so the block pads explicitly instead.
    return keras.layers.Conv2D(filters, size, strides=stride, padding="valid", use_bias=False,
                               kernel_initializer=torch_default_kernel_initializer(), name=name, dtype=dtype)


def _pad1(x):
    return tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])


@keras.saving.register_keras_serializable(package="dgm_tf")
class ResNetBasicBlock(keras.layers.Layer):
    """conv 3x3/stride + BN + ReLU, conv 3x3 + BN, plus the shortcut (1x1/stride + BN when
    the shape changes), ReLU (networks/resnet.py ``BasicBlock``)."""

    def __init__(self, filters: int, stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.stride = int(filters), int(stride)
        dtype = self.dtype_policy
        self.conv1 = _conv(self.filters, 3, self.stride, "conv1", dtype)
        self.bn1 = _bn("bn1", TRUNK_BN_MOMENTUM, dtype)
        self.conv2 = _conv(self.filters, 3, 1, "conv2", dtype)
        self.bn2 = _bn("bn2", TRUNK_BN_MOMENTUM, dtype)
        self.shortcut_conv = self.shortcut_bn = None

    def build(self, input_shape):
        n, h, w, c = tuple(input_shape)
        self.conv1.build((n, h + 2, w + 2, c))
        mid = self.conv1.compute_output_shape((n, h + 2, w + 2, c))
        self.bn1.build(mid)
        self.conv2.build((n, mid[1] + 2, mid[2] + 2, mid[3]))
        self.bn2.build(mid)
        if self.stride != 1 or int(c) != self.filters:
            self.shortcut_conv = _conv(self.filters, 1, self.stride, "shortcut_conv", self.dtype_policy)
            self.shortcut_bn = _bn("shortcut_bn", TRUNK_BN_MOMENTUM, self.dtype_policy)
            self.shortcut_conv.build(tuple(input_shape))
            self.shortcut_bn.build(self.shortcut_conv.compute_output_shape(tuple(input_shape)))
        self.built = True

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        return (n, (h - 1) // self.stride + 1, (w - 1) // self.stride + 1, self.filters)

    def call(self, x, training=None, whole_batch=False):
        out = tf.nn.relu(self.bn1(self.conv1(_pad1(x)), training=training, whole_batch=whole_batch))
        out = self.bn2(self.conv2(_pad1(out)), training=training, whole_batch=whole_batch)
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_bn(self.shortcut_conv(x), training=training, whole_batch=whole_batch)
        return tf.nn.relu(out + shortcut)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, stride=self.stride)
        return config


@keras.saving.register_keras_serializable(package="dgm_tf")
class ResNet18Critic(keras.Model):
    """The ResNet-18 discriminator (module docstring), with ``Discriminator``'s interface:
    ``call(images, training, whole_batch)`` returns ``(critic [N], logits [N, classes])``
    in float32, ``with_classes`` widens the class head.

    Args:
        num_classes: Logits of the class head.
        image_channels: Input channels (the reference's ImageNet: 3).
        image_size: Input height and width; the average pool covers the last stage's
            whole map (4x4 at 32x32, the reference's ``AvgPool2d(4)``).
        features: Width of the features both heads read (reference 2048).
        dtype: Keras dtype policy of the trunk; the heads compute in float32.
    """

    def __init__(self, num_classes: int, image_channels: int = 3, image_size: int = 32, features: int = FEATURES,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.image_channels = int(image_channels)
        self.image_size = int(image_size)
        self.features_width = int(features)
        dtype = self.dtype_policy
        self.stem_conv = _conv(STAGES[0], 3, 1, "stem_conv", dtype)
        self.stem_bn = _bn("stem_bn", TRUNK_BN_MOMENTUM, dtype)
        self.blocks = [
            ResNetBasicBlock(width, stride=2 if (stage > 0 and j == 0) else 1, name=f"layer{stage + 1}_{j}",
                             dtype=dtype)
            for stage, width in enumerate(STAGES) for j in range(BLOCKS_PER_STAGE)
        ]
        self.pool = keras.layers.GlobalAveragePooling2D(name="avgpool", dtype=dtype)
        self.fc = keras.layers.Dense(self.features_width, kernel_initializer=torch_default_kernel_initializer(),
                                     bias_initializer=torch_default_bias_initializer(STAGES[-1]), name="fc",
                                     dtype=dtype)
        self.feature_bn = _bn("feature_bn", FEATURE_BN_MOMENTUM, dtype)
        head = dict(kernel_initializer=torch_default_kernel_initializer(),
                    bias_initializer=torch_default_bias_initializer(self.features_width), dtype="float32")
        self.critic_head = keras.layers.Dense(1, name="critic", **head)
        self.class_head = keras.layers.Dense(self.num_classes, name="classifier", **head)
        self.build((None, self.image_size, self.image_size, self.image_channels))

    def build(self, input_shape):
        n, h, w, c = tuple(input_shape)
        self.stem_conv.build((n, h + 2, w + 2, c))
        shape = self.stem_conv.compute_output_shape((n, h + 2, w + 2, c))
        self.stem_bn.build(shape)
        for block in self.blocks:
            block.build(shape)
            shape = block.compute_output_shape(shape)
        self.pool.build(shape)
        self.fc.build((n, STAGES[-1]))
        self.feature_bn.build((n, self.features_width))
        self.critic_head.build((n, self.features_width))
        self.class_head.build((n, self.features_width))
        self.built = True

    def features(self, images, training=None, whole_batch=False):
        x = tf.nn.relu(self.stem_bn(self.stem_conv(_pad1(images)), training=training, whole_batch=whole_batch))
        for block in self.blocks:
            x = block(x, training=training, whole_batch=whole_batch)
        h = self.fc(self.pool(x))
        return tf.nn.relu(self.feature_bn(h, training=training, whole_batch=whole_batch))

    def call(self, images, training=None, whole_batch=False):
        h = tf.cast(self.features(images, training=training, whole_batch=whole_batch), tf.float32)
        return tf.reshape(self.critic_head(h), [-1]), self.class_head(h)

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "image_channels": self.image_channels,
                "image_size": self.image_size, "features": self.features_width, "dtype": self.dtype_policy.name}

    def with_classes(self, num_classes: int) -> "ResNet18Critic":
        """A copy with a wider class head: trunk, features, critic and old class rows copied."""
        if num_classes < self.num_classes:
            raise ValueError("the auxiliary head never shrinks")
        new = ResNet18Critic(num_classes, self.image_channels, self.image_size, self.features_width, name=self.name,
                             dtype=self.dtype_policy.name)
        copy_into_wider_model(new, self, new.class_head, self.class_head)
        return new
