"""Dynamos's gating agent: per-sample, per-channel keep/drop decisions for a convolution.

Dynamos (Varma, Arani, Zonooz, "Dynamically Modular and Sparse General Continual
Learning", VISAPP 2023, arXiv 2301.00620) gates the output channels of every convolution
of its gated blocks with an *agent*: a small network that reads the convolution's input
and returns, per sample, a keep probability per output channel. Training samples the
actions from those probabilities (REINFORCE, ``dgm_tf.methods.dynamos_core.policy_loss``);
inference thresholds them, so the exported classifier is deterministic.

The agent, as the reference's ``Agent`` / ``SelfAttention`` (NeurAI-Lab/
DynamicContinualLearning, backbone/GatedResNet.py):

- features = BN(conv1x1(x)) (no bias, ``channels`` outputs), globally average-pooled
  to ``pooled`` ``[N, channels]``;
- an SE-style gate FC(channels -> channels // 16) -> ReLU -> FC -> sigmoid on
  ``pooled``; the *policy logits* are ``pooled * gate``;
- keep probability ``p = sigmoid(policy_logits / 0.15)``;
- training: actions ~ Bernoulli(p); inference: actions = ``p >= 0.5``.

Randomness is never hidden state: a training call takes either ``noise`` (uniforms in
[0, 1), one per sample and channel; action = ``noise < p``, which is Bernoulli(p)) or a
``seed`` (a shape-[2] integer tensor for ``tf.random.stateless_uniform``, which draws
that noise). The same seed or noise gives the same actions, so a step can be replayed
after a resume, and noise drawn for the global batch and split with it gives N
replicas one device's actions.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from dgm_tf.layers.replica_batch_norm import ReplicaBatchNormalization

# Defaults of the reference's ``add_policy_args`` (NeurAI-Lab/DynamicContinualLearning,
# utils/args.py): --temperature 0.15, --hidden-dim-ratio 16, --inf-thresh 0.5 (with the
# default --infer-mode threshold).
TEMPERATURE = 0.15
HIDDEN_DIM_RATIO = 16
INFERENCE_THRESHOLD = 0.5

# PyTorch's BatchNorm2d defaults (momentum 0.1 on the new value = Keras 0.9, eps 1e-5):
# the reference never changes them.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def torch_default_kernel_initializer():
    """PyTorch's default Conv2d / Linear weight init (kaiming_uniform, a=sqrt(5)):
    U(+-1/sqrt(fan_in)), fan_in = inputs x kernel area.

    The reference initialises no layer explicitly (backbone/GatedResNet.py), so every
    convolution and linear layer starts from PyTorch's defaults.
    """
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def torch_default_bias_initializer(fan_in: int):
    """PyTorch's default Linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(int(fan_in))
    return keras.initializers.RandomUniform(-bound, bound)


@keras.saving.register_keras_serializable(package="dgm_tf")
class GatingAgent(keras.layers.Layer):
    """Keep probabilities and actions for the ``channels`` outputs of a convolution.

    Called on the input the gated convolution reads (``[N, H, W, C_in]``); returns
    ``(actions, probabilities, policy_logits)``, each ``[N, channels]`` float32.

    Args:
        channels: Output channels of the gated convolution (one action each).
        hidden_ratio: The SE gate's bottleneck is ``max(1, channels // hidden_ratio)``.
        temperature: ``p = sigmoid(policy_logits / temperature)``.
        threshold: Inference keeps a channel when ``p >= threshold``.

    Call args:
        inputs: ``[N, H, W, C_in]``.
        training: BN batch statistics and sampled actions when true; moving statistics
            and thresholded actions otherwise.
        seed: shape-[2] int32/int64 tensor; training draws
            ``tf.random.stateless_uniform([N, channels], seed)`` as the noise.
        noise: ``[N, channels]`` uniforms in [0, 1), used instead of ``seed``.

    Example:
        >>> agent = GatingAgent(64)
        >>> actions, p, logits = agent(x, training=True, seed=tf.constant([1, 2]))
        >>> keep, _, _ = agent(x)  # inference: p >= 0.5, no randomness

    Reference:
        arXiv 2301.00620, Sec. 3; NeurAI-Lab/DynamicContinualLearning,
        backbone/GatedResNet.py (``Agent``, ``SelfAttention``, ``Sigmoid``).
    """

    def __init__(self, channels: int, hidden_ratio: int = HIDDEN_DIM_RATIO, temperature: float = TEMPERATURE,
                 threshold: float = INFERENCE_THRESHOLD, **kwargs):
        kwargs.setdefault("dtype", "float32")  # sigmoid(x / 0.15) is steep: keep the agent in float32
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.hidden_ratio = int(hidden_ratio)
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        if self.channels < 1 or self.hidden_ratio < 1:
            raise ValueError(f"channels and hidden_ratio must be >= 1, got {channels} and {hidden_ratio}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.hidden = max(1, self.channels // self.hidden_ratio)
        self.pointwise = keras.layers.Conv2D(
            self.channels, 1, use_bias=False, kernel_initializer=torch_default_kernel_initializer(),
            name="pointwise", dtype=self.dtype_policy,
        )
        self.bn = ReplicaBatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="bn",
                                            dtype=self.dtype_policy)
        self.squeeze = keras.layers.Dense(
            self.hidden, kernel_initializer=torch_default_kernel_initializer(),
            bias_initializer=torch_default_bias_initializer(self.channels), name="squeeze", dtype=self.dtype_policy,
        )
        self.excite = keras.layers.Dense(
            self.channels, kernel_initializer=torch_default_kernel_initializer(),
            bias_initializer=torch_default_bias_initializer(self.hidden), name="excite", dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.pointwise.build(input_shape)
        features = self.pointwise.compute_output_shape(input_shape)
        self.bn.build(features)
        self.squeeze.build((input_shape[0], self.channels))
        self.excite.build((input_shape[0], self.hidden))
        self.built = True

    def policy_logits(self, inputs, training=None):
        """``pooled * gate``, ``[N, channels]`` float32 (no randomness)."""
        features = self.bn(self.pointwise(tf.cast(inputs, self.compute_dtype)), training=training)
        pooled = tf.reduce_mean(tf.cast(features, tf.float32), axis=[1, 2])
        gate = tf.sigmoid(self.excite(tf.nn.relu(self.squeeze(pooled))))
        return pooled * gate

    def keep_probabilities(self, policy_logits):
        return tf.sigmoid(policy_logits / self.temperature)

    def call(self, inputs, training=None, seed=None, noise=None):
        logits = self.policy_logits(inputs, training=training)
        probabilities = self.keep_probabilities(logits)
        if training:
            if noise is None:
                if seed is None:
                    raise ValueError("GatingAgent: a training call samples its actions and needs `seed` or `noise`")
                noise = tf.random.stateless_uniform(tf.shape(probabilities), seed=seed, dtype=tf.float32)
            # P(U < p) = p for U ~ U[0, 1): a Bernoulli(p) draw, with no gradient.
            actions = tf.cast(tf.cast(noise, tf.float32) < probabilities, tf.float32)
        else:
            actions = tf.cast(probabilities >= self.threshold, tf.float32)
        return tf.stop_gradient(actions), probabilities, logits

    def compute_output_shape(self, input_shape):
        shape = (input_shape[0], self.channels)
        return shape, shape, shape

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            hidden_ratio=self.hidden_ratio,
            temperature=self.temperature,
            threshold=self.threshold,
        )
        return config
