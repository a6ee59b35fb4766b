"""Dynamos's gated ResNet: two stages of basic blocks, the second gated by agents.

Follows NeurAI-Lab/DynamicContinualLearning, backbone/GatedResNet.py (``gatedresnet``
with ``num_blocks=(2, 2)``, ``nf=32``) for arXiv 2301.00620 (Varma, Arani, Zonooz,
VISAPP 2023):

- stem: conv3x3 (nf, no bias) -> BN -> ReLU; a grayscale image is repeated to three
  channels first (the reference's MNIST loaders stack the digit into RGB,
  datasets/seq_mnist.py ``MyMNIST.__getitem__``);
- stage 1: two basic blocks, nf channels, stride 1, never gated (the reference's
  ``OldBasic``);
- stage 2: two basic blocks, 2 nf channels, the first with stride 2 and a 1x1 conv + BN
  shortcut; each has two agents (``GatingAgent``), so 4 agents x 64 channels. Agent 1
  reads the block input, agent 2 the block's intermediate map (after the first
  conv-BN-gate-ReLU), as in the reference's ``BasicBlock.forward``. Actions multiply
  the BN output before the ReLU; the second agent's actions also multiply the shortcut;
- global average pooling, a linear head over the classes seen so far (``with_classes``
  widens it, as ``CNNClassifier.with_classes`` does; the reference's head has every
  class of the scenario from the start).

``call(images, training, gated=True, seed=None, gate_noise=None)`` returns a dict:
``logits`` ``[N, classes]`` and, when gated, the concatenated ``policy_logits``,
``probabilities`` and ``actions`` ``[N, 256]`` (agent order: block 3 conv 1, block 3
conv 2, block 4 conv 1, block 4 conv 2). ``gated=False`` runs every block ungated (the
reference's warm-up). A gated training call needs ``seed`` (one shape-[2] tensor; the
agents' noise is ``gate_noise(seed, batch)``, split per agent) or ``gate_noise``
itself (``[N, 256]`` uniforms, e.g. drawn for the global batch in the input pipeline).

Convolutions pad explicitly by 1 pixel on every side as PyTorch's ``padding=1`` does
(Keras's ``same`` pads a stride-2 convolution of an even input only at the end);
weights and biases start from PyTorch's defaults, as the reference sets none; BN uses
PyTorch's momentum and epsilon.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from dgm_tf.layers.gating import (
    BN_EPSILON,
    BN_MOMENTUM,
    HIDDEN_DIM_RATIO,
    TEMPERATURE,
    GatingAgent,
    torch_default_bias_initializer,
    torch_default_kernel_initializer,
)
from dgm_tf.layers.replica_batch_norm import ReplicaBatchNormalization
from dgm_tf.models.discriminator import copy_into_wider_model

NF = 32  # the reference's --nf default and every best_args setting
BLOCKS_PER_STAGE = 2


def _conv3x3(filters: int, stride: int, name: str) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, 3, strides=stride, padding="valid", use_bias=False,
                               kernel_initializer=torch_default_kernel_initializer(), name=name)


def _bn(name: str) -> ReplicaBatchNormalization:
    return ReplicaBatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _pad1(x):
    return tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])


@keras.saving.register_keras_serializable(package="dgm_tf")
class DynamosBlock(keras.layers.Layer):
    """ResNet basic block, optionally with one ``GatingAgent`` per convolution.

    ``call(x, training, gated=True, noise=None)`` returns ``(output, gates)``:
    ``gates`` is a list of ``(actions, probabilities, logits)``, one per agent, empty
    when the block has no agents or runs ungated. ``noise``: a pair of ``[N, filters]``
    uniforms (one per agent), needed by a gated training call.

    Args:
        filters: Output channels.
        stride: Stride of the first convolution (and of the 1x1 shortcut, which exists
            when the stride is not 1 or the input has other than ``filters`` channels).
        gated: Whether the block has agents.
        hidden_ratio, temperature: The agents' (``GatingAgent``).

    Reference:
        NeurAI-Lab/DynamicContinualLearning, backbone/GatedResNet.py (``BasicBlock``)
        and backbone/TinyResNet18.py (``BasicBlock``, the ungated one).
    """

    def __init__(self, filters: int, stride: int = 1, gated: bool = False, hidden_ratio: int = HIDDEN_DIM_RATIO,
                 temperature: float = TEMPERATURE, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.stride = int(stride)
        self.gated = bool(gated)
        self.hidden_ratio = int(hidden_ratio)
        self.temperature = float(temperature)
        self.conv1 = _conv3x3(self.filters, self.stride, "conv1")
        self.bn1 = _bn("bn1")
        self.conv2 = _conv3x3(self.filters, 1, "conv2")
        self.bn2 = _bn("bn2")
        self.shortcut_conv = None
        self.shortcut_bn = None
        self.agents = []
        if self.gated:
            self.agents = [
                GatingAgent(self.filters, self.hidden_ratio, self.temperature, name=f"agent{i + 1}")
                for i in range(2)
            ]

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        n, h, w, c = input_shape
        padded = (n, None if h is None else h + 2, None if w is None else w + 2, c)
        self.conv1.build(padded)
        mid = self.conv1.compute_output_shape(padded)
        self.bn1.build(mid)
        mid_padded = (n, None if mid[1] is None else mid[1] + 2, None if mid[2] is None else mid[2] + 2, mid[3])
        self.conv2.build(mid_padded)
        self.bn2.build(mid)
        if self.stride != 1 or int(c) != self.filters:
            self.shortcut_conv = keras.layers.Conv2D(
                self.filters, 1, strides=self.stride, padding="valid", use_bias=False,
                kernel_initializer=torch_default_kernel_initializer(), name="shortcut_conv",
            )
            self.shortcut_bn = _bn("shortcut_bn")
            self.shortcut_conv.build(input_shape)
            self.shortcut_bn.build(self.shortcut_conv.compute_output_shape(input_shape))
        if self.agents:
            self.agents[0].build(input_shape)
            self.agents[1].build(mid)
        self.built = True

    @property
    def agent_channels(self) -> list[int]:
        return [self.filters] * len(self.agents)

    def _shortcut(self, x, training):
        if self.shortcut_conv is None:
            return x
        return self.shortcut_bn(self.shortcut_conv(x), training=training)

    def call(self, inputs, training=None, gated=True, noise=None):
        x = inputs
        if not (gated and self.agents):
            out = tf.nn.relu(self.bn1(self.conv1(_pad1(x)), training=training))
            out = self.bn2(self.conv2(_pad1(out)), training=training) + self._shortcut(x, training)
            return tf.nn.relu(out), []
        noise = [None, None] if noise is None else list(noise)
        gates = []
        actions1, p1, logits1 = self.agents[0](x, training=training, noise=noise[0])
        gates.append((actions1, p1, logits1))
        out = self.bn1(self.conv1(_pad1(x)), training=training)
        out = tf.nn.relu(out * tf.cast(actions1[:, None, None, :], out.dtype))
        actions2, p2, logits2 = self.agents[1](out, training=training, noise=noise[1])
        gates.append((actions2, p2, logits2))
        keep2 = tf.cast(actions2[:, None, None, :], out.dtype)
        out = self.bn2(self.conv2(_pad1(out)), training=training) * keep2 + self._shortcut(x, training) * keep2
        return tf.nn.relu(out), gates

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        shrink = lambda d: None if d is None else (d - 1) // self.stride + 1  # noqa: E731
        return (n, shrink(h), shrink(w), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, stride=self.stride, gated=self.gated,
                      hidden_ratio=self.hidden_ratio, temperature=self.temperature)
        return config


@keras.saving.register_keras_serializable(package="dgm_tf")
class DynamosResNet(keras.Model):
    """The gated ResNet of Dynamos (module docstring): stage 1 ungated, stage 2 gated.

    Args:
        num_classes: Logits of the head (the classes seen so far).
        image_channels: 1 (repeated to 3) or 3.
        image_size: Height and width the network is built for (any size runs: the
            head reads a global average pool).
        nf: Width of stage 1 (stage 2 has 2 nf).
        hidden_ratio, temperature: The agents' (``GatingAgent``).

    Example:
        >>> net = DynamosResNet(num_classes=2)
        >>> out = net(images, training=True, seed=tf.constant([0, 7]))
        >>> out["logits"], out["actions"]  # [N, 2], [N, 256]
        >>> net.with_classes(4)  # head widened, every weight copied

    Reference:
        arXiv 2301.00620; NeurAI-Lab/DynamicContinualLearning, backbone/GatedResNet.py.
    """

    def __init__(self, num_classes: int, image_channels: int = 1, image_size: int = 32, nf: int = NF,
                 hidden_ratio: int = HIDDEN_DIM_RATIO, temperature: float = TEMPERATURE, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.image_channels = int(image_channels)
        self.image_size = int(image_size)
        self.nf = int(nf)
        self.hidden_ratio = int(hidden_ratio)
        self.temperature = float(temperature)
        if self.num_classes < 1 or self.nf < 1:
            raise ValueError(f"num_classes and nf must be >= 1, got {num_classes} and {nf}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {image_channels}")
        self.stem_conv = _conv3x3(self.nf, 1, "stem_conv")
        self.stem_bn = _bn("stem_bn")
        self.blocks = []
        for stage in range(2):
            for j in range(BLOCKS_PER_STAGE):
                stride = 2 if (stage > 0 and j == 0) else 1
                self.blocks.append(DynamosBlock(
                    self.nf * 2**stage, stride=stride, gated=stage > 0, hidden_ratio=self.hidden_ratio,
                    temperature=self.temperature, name=f"stage{stage + 1}_block{j + 1}",
                ))
        features = self.nf * 2
        self.pool = keras.layers.GlobalAveragePooling2D(name="global_pool")
        self.head = keras.layers.Dense(
            self.num_classes, kernel_initializer=torch_default_kernel_initializer(),
            bias_initializer=torch_default_bias_initializer(features), name="head", dtype="float32",
        )
        self.build((None, self.image_size, self.image_size, self.image_channels))

    def build(self, input_shape):
        n, h, w, _ = tuple(input_shape)
        shape = (n, None if h is None else h + 2, None if w is None else w + 2, 3)
        self.stem_conv.build(shape)
        shape = self.stem_conv.compute_output_shape(shape)
        self.stem_bn.build(shape)
        for block in self.blocks:
            block.build(shape)
            shape = block.compute_output_shape(shape)
        self.pool.build(shape)
        self.head.build(self.pool.compute_output_shape(shape))
        self.built = True

    @property
    def gated_blocks(self) -> list[DynamosBlock]:
        return [b for b in self.blocks if b.gated]

    @property
    def agent_channels(self) -> list[int]:
        """Channels of each agent, in the order of the concatenated outputs ([64] * 4)."""
        return [c for b in self.gated_blocks for c in b.agent_channels]

    @property
    def gate_width(self) -> int:
        """Width of the concatenated policy logits / actions (256)."""
        return sum(self.agent_channels)

    @property
    def agents(self) -> list[GatingAgent]:
        return [a for b in self.gated_blocks for a in b.agents]

    def gate_noise(self, seed, batch):
        """The ``[batch, gate_width]`` uniforms a training call with ``seed`` uses."""
        return tf.random.stateless_uniform([batch, self.gate_width], seed=seed, dtype=tf.float32)

    def _stem(self, images, training):
        x = tf.convert_to_tensor(images)
        if self.image_channels == 1:
            x = tf.repeat(x, 3, axis=-1)
        return tf.nn.relu(self.stem_bn(self.stem_conv(_pad1(x)), training=training))

    def call(self, images, training=None, gated=True, seed=None, gate_noise=None):
        x = self._stem(images, training)
        if gated and training and gate_noise is None:
            if seed is None:
                raise ValueError("DynamosResNet: a gated training call samples actions and needs `seed` or "
                                 "`gate_noise`")
            gate_noise = self.gate_noise(seed, tf.shape(x)[0])
        noise_per_block = None
        if gated and training:
            widths = [sum(b.agent_channels) for b in self.gated_blocks]
            noise_per_block = iter(tf.split(gate_noise, widths, axis=1))
        gates = []
        for block in self.blocks:
            noise = None
            if block.gated and noise_per_block is not None:
                noise = tf.split(next(noise_per_block), 2, axis=1)
            x, block_gates = block(x, training=training, gated=gated, noise=noise)
            gates.extend(block_gates)
        logits = self.head(tf.cast(self.pool(x), tf.float32))
        if not gated:
            return {"logits": logits}
        actions, probabilities, policy_logits = (tf.concat(parts, axis=1) for parts in zip(*gates))
        return {"logits": logits, "policy_logits": policy_logits, "probabilities": probabilities,
                "actions": actions}

    def classify(self, images):
        """Inference logits: moving BN statistics, gates thresholded (what is exported)."""
        return self(images, training=False, gated=True)["logits"]

    def get_config(self):
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_channels": self.image_channels,
            "image_size": self.image_size,
            "nf": self.nf,
            "hidden_ratio": self.hidden_ratio,
            "temperature": self.temperature,
        }

    def with_classes(self, num_classes: int) -> "DynamosResNet":
        """A copy with a wider head: every weight (BN statistics and agents included) and
        the old class rows copied, the new rows freshly initialised (Keras's global RNG)."""
        if num_classes < self.num_classes:
            raise ValueError(f"the class head never shrinks ({self.num_classes} -> {num_classes})")
        new = DynamosResNet(num_classes, self.image_channels, self.image_size, self.nf, self.hidden_ratio,
                            self.temperature, name=self.name)
        copy_into_wider_model(new, self, new.head, self.head)
        return new


def split_agents(concatenated, agent_channels: Sequence[int]) -> list:
    """The per-agent parts of a concatenated ``[N, sum(agent_channels)]`` tensor."""
    return tf.split(concatenated, list(agent_channels), axis=1)
