"""NISPA's sparse networks: the MLP 400-400-400 and the ConvNet, built from masked layers.

Both follow BurakGurbuz97/NISPA, NISPA/NISPA/model.py (``MLP``, ``ConvNet``) for
arXiv 2206.09117 (Gurbuz & Dovrolis, ICML 2022): ReLU, no normalisation, every layer
(the logit layer included) sparse at the target density, the first conv dense, conv
sparsity per whole kernel, biases never pruned.

A network exposes what NISPA's pure pieces (``dgm_tf.methods.nispa_core``) need:
``sparse_layers`` (in order), ``sources()`` (which unit feeds each mask row; only the
ConvNet's first dense layer, reading the flattened NHWC map, needs one) and
``unit_activations(x)`` (the post-ReLU outputs of the hidden unit layers, as the
reference's ``forward_activations``).
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from dgm_tf.layers.sparse_masked import SparseMaskedConv2D, SparseMaskedDense
from dgm_tf.methods import nispa_core

# Target densities of the reference's experiment scripts: --prune_perc 80 (MLP,
# NISPA/EFMNIST_experiment.sh) and 90 (ConvNet, NISPA/CIFAR10_experiment.sh).
MLP_DENSITY = 0.2
CONVNET_DENSITY = 0.1


class _SparseNetwork(keras.Model):
    """What both networks share: layer order, mask/weight access, initialisation."""

    sparse_layers: list

    def sources(self) -> list:
        """Per sparse layer, the unit of the previous unit layer feeding each mask row."""
        return [None] * len(self.sparse_layers)

    def masks(self) -> list[np.ndarray]:
        return [layer.connection_mask() for layer in self.sparse_layers]

    def set_masks(self, masks: Sequence[np.ndarray]) -> None:
        for layer, mask in zip(self.sparse_layers, masks):
            layer.set_connectivity(mask)

    def kernels(self) -> list[np.ndarray]:
        return [np.asarray(layer.kernel.numpy()) for layer in self.sparse_layers]

    def biases(self) -> list[np.ndarray]:
        return [np.asarray(layer.bias.numpy()) for layer in self.sparse_layers]

    def set_kernels(self, kernels: Sequence[np.ndarray]) -> None:
        for layer, kernel in zip(self.sparse_layers, kernels):
            layer.kernel.assign(np.asarray(kernel, np.float32))

    def set_biases(self, biases: Sequence[np.ndarray]) -> None:
        for layer, bias in zip(self.sparse_layers, biases):
            layer.bias.assign(np.asarray(bias, np.float32))

    def set_frozen(self, freeze: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        for layer, (kernel_frozen, bias_frozen) in zip(self.sparse_layers, freeze):
            layer.set_frozen(kernel_frozen, bias_frozen)

    def initialize_sparse(self, density: float, rng: np.random.Generator, dense_first: bool) -> None:
        """Random masks at ``density`` (exact count), Kaiming-normal fan-out kernels
        (absent weights 0), zero biases, nothing frozen. Built first.

        Draw order (fixed, for reproducibility): per layer, the mask then the kernel.
        """
        for i, layer in enumerate(self.sparse_layers):
            if i == 0 and dense_first:
                mask = np.ones(layer.mask_shape, bool)
            else:
                mask = nispa_core.random_connectivity(layer.mask_shape, density, rng)
            kernel = nispa_core.kaiming_normal_fan_out(layer.kernel.shape, rng)
            layer.set_connectivity(mask)
            layer.kernel.assign(nispa_core.apply_connectivity(kernel, mask))
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
            layer.set_frozen(np.zeros(layer.mask_shape, bool), np.zeros(layer.bias.shape, bool))


@keras.saving.register_keras_serializable(package="dgm_tf")
class NispaMLP(_SparseNetwork):
    """input (flattened) -> 400 -> 400 -> 400 -> classes, ReLU, sparse masked layers.

    Unit layers: the input pixels (all stable), three hidden layers of 400, the logits.
    ``call`` returns the raw logits ``[N, num_classes]`` (the task head mask is applied
    by the caller, ``nispa_core.apply_head_mask``).
    """

    def __init__(self, num_classes: int, hidden: Sequence[int] = (400, 400, 400), **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.hidden = tuple(int(h) for h in hidden)
        self.flatten = keras.layers.Flatten(name="flatten")
        self.sparse_layers = [SparseMaskedDense(h, name=f"fc{i + 1}") for i, h in enumerate(self.hidden)]
        self.sparse_layers.append(SparseMaskedDense(self.num_classes, name="logits"))

    def unit_activations(self, images) -> list:
        """Post-ReLU outputs of the hidden layers, ``[N, units]`` each."""
        x = self.flatten(images)
        outputs = []
        for layer in self.sparse_layers[:-1]:
            x = tf.nn.relu(layer(x))
            outputs.append(x)
        return outputs

    def call(self, images, training=False):
        return self.sparse_layers[-1](self.unit_activations(images)[-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, hidden=list(self.hidden))
        return config


@keras.saving.register_keras_serializable(package="dgm_tf")
class NispaConvNet(_SparseNetwork):
    """conv64, conv64, maxpool, conv128, conv128, maxpool, fc 1024, fc classes.

    3x3 convolutions with padding 1 (``same``), ReLU, no BatchNorm. Unit layers: the
    image channels, the channels of the four convolutions (the second and fourth
    measured after their max pool, as the reference's ``forward_activations`` returns
    them), the 1024 dense units, the logits. The first dense layer reads the NHWC map
    flattened, so its row r comes from channel ``r % 128`` (``sources``).
    """

    CONV_WIDTHS = (64, 64, 128, 128)
    POOL_AFTER = (1, 3)  # indices of the convolutions followed by 2x2 max pooling

    def __init__(self, num_classes: int, dense_units: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.dense_units = int(dense_units)
        self.convs = [SparseMaskedConv2D(w, 3, padding="same", name=f"conv{i + 1}")
                      for i, w in enumerate(self.CONV_WIDTHS)]
        self.pool = keras.layers.MaxPooling2D(2, name="pool")
        self.flatten = keras.layers.Flatten(name="flatten")
        self.fc = SparseMaskedDense(self.dense_units, name="fc1")
        self.logits_layer = SparseMaskedDense(self.num_classes, name="logits")
        self.sparse_layers = self.convs + [self.fc, self.logits_layer]

    def sources(self) -> list:
        rows = int(self.fc.kernel.shape[0])
        channels = self.CONV_WIDTHS[-1]
        return [None] * len(self.convs) + [np.arange(rows) % channels, None]

    def unit_activations(self, images) -> list:
        """Post-ReLU (after pooling where there is one) maps of the convolutions
        ``[N, H, W, C]``, then the dense layer's ``[N, 1024]``."""
        x = images
        outputs = []
        for i, conv in enumerate(self.convs):
            x = tf.nn.relu(conv(x))
            if i in self.POOL_AFTER:
                x = self.pool(x)
            outputs.append(x)
        outputs.append(tf.nn.relu(self.fc(self.flatten(x))))
        return outputs

    def call(self, images, training=False):
        return self.logits_layer(self.unit_activations(images)[-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, dense_units=self.dense_units)
        return config


def build_nispa_network(kind: str, num_classes: int, input_shape: Sequence[int], density: float | None = None,
                        seed=0, mlp_hidden: Sequence[int] | None = None,
                        dense_units: int | None = None) -> _SparseNetwork:
    """A built NISPA network with random masks and Kaiming-normal fan-out weights.

    ``kind``: ``"mlp"`` or ``"conv"``. ``input_shape``: one image (H, W, C). ``density``
    defaults to the reference's (0.2 MLP, 0.1 ConvNet). ``seed``: anything
    ``numpy.random.default_rng`` accepts (an int, a tuple) or a Generator; every draw
    comes from it, so the same seed gives the same network. ``mlp_hidden``: the MLP's
    hidden widths (default the reference's 400, 400, 400); ``dense_units``: the
    ConvNet's dense layer (default the reference's 1024); each ignored by the other.

    Initialisation: every kernel N(0, 2 / fan_out), biases 0. The reference's ConvNet
    starts with fan-in Kaiming weights and its MLP with PyTorch's default uniform
    biases, but both re-initialise with fan-out and zero biases at every task end
    (NISPA/NISPA/model.py, ``_initialize_weights`` / ``re_initialize``); this uses the
    latter from the start.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if kind == "mlp":
        net = NispaMLP(num_classes) if mlp_hidden is None else NispaMLP(num_classes, hidden=mlp_hidden)
        density = MLP_DENSITY if density is None else density
        dense_first = False
    elif kind == "conv":
        net = NispaConvNet(num_classes) if dense_units is None else NispaConvNet(num_classes, dense_units=dense_units)
        density = CONVNET_DENSITY if density is None else density
        dense_first = True  # the reference's random_prune(skip_first=True)
    else:
        raise ValueError(f"kind must be 'mlp' or 'conv', got {kind!r}")
    net(tf.zeros((1,) + tuple(int(d) for d in input_shape)))
    net.initialize_sparse(density, rng, dense_first)
    return net
