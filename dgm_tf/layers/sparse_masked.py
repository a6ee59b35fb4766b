"""Dense and 2D convolution layers with a fixed binary connectivity mask (NISPA).

NISPA (Gurbuz & Dovrolis, ICML 2022, arXiv 2206.09117) trains sparse networks whose
connectivity is a binary mask per layer: a connection either exists (its weight trains)
or does not (its weight is 0 and gets no gradient). The mask is not learned; the method
changes it between training phases (drop/regrow, ``dgm_tf.methods.nispa_core``). After a
task, the connections between stable units and the stable units' biases are frozen.

Both pieces of state live in the layer as non-trainable variables created in
``build()``, so they travel with ``get_weights()`` / checkpoints and changing them
(``set_connectivity``, ``set_frozen``) never retraces a compiled step:

- ``connectivity``: Dense ``(in, out)``; Conv2D ``(in_channels, out_channels)``, one entry
  per whole kernel (the reference prunes a conv layer per (output, input) channel pair:
  BurakGurbuz97/NISPA, NISPA/NISPA/model.py, ``random_prune``). Biases are never pruned.
- ``kernel_trainable`` (same shape as ``connectivity``) and ``bias_trainable`` ``(out,)``:
  1 where the parameter may change, 0 where it is frozen. A trainer multiplies the
  gradients by them (``mask_frozen_gradients``), as the reference zeroes the frozen
  gradients before every optimizer step (NISPA/NISPA/training.py,
  ``reset_frozen_gradients``).

The forward pass uses ``kernel * connectivity``, so an absent connection contributes
nothing and its kernel entry gets a zero gradient whatever value it holds
(NISPA/NISPA/model.py, ``MaskedLinearDynamic.forward`` / ``MaskedConv2dDynamic.forward``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf


class _SparseMaskedMixin:
    """State and helpers shared by the two masked layers (after ``build``)."""

    def _add_mask_state(self, mask_shape: tuple[int, ...], units: int) -> None:
        self.connectivity = self.add_weight(
            name="connectivity", shape=mask_shape, initializer="ones", trainable=False
        )
        self.kernel_trainable = self.add_weight(
            name="kernel_trainable", shape=mask_shape, initializer="ones", trainable=False
        )
        self.bias_trainable = self.add_weight(
            name="bias_trainable", shape=(units,), initializer="ones", trainable=False
        )

    @property
    def mask_shape(self) -> tuple[int, int]:
        """Shape of the connectivity mask: (inputs, outputs); conv: (in, out) channels."""
        return tuple(int(d) for d in self.connectivity.shape)

    def connection_mask(self) -> np.ndarray:
        """The connectivity mask as a boolean array of ``mask_shape``."""
        return np.asarray(self.connectivity.numpy()) > 0.5

    def set_connectivity(self, mask) -> None:
        mask = np.asarray(mask)
        if mask.shape != self.mask_shape:
            raise ValueError(f"connectivity must have shape {self.mask_shape}, got {mask.shape}")
        self.connectivity.assign(mask.astype(np.float32))

    def frozen_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel_frozen, bias_frozen) as boolean arrays."""
        return (
            np.asarray(self.kernel_trainable.numpy()) < 0.5,
            np.asarray(self.bias_trainable.numpy()) < 0.5,
        )

    def set_frozen(self, kernel_frozen, bias_frozen) -> None:
        """Freeze the connections (``mask_shape``) and biases where the masks are True."""
        kernel_frozen = np.asarray(kernel_frozen, bool)
        bias_frozen = np.asarray(bias_frozen, bool)
        if kernel_frozen.shape != self.mask_shape or bias_frozen.shape != tuple(self.bias.shape):
            raise ValueError(
                f"frozen masks must have shapes {self.mask_shape} and {tuple(self.bias.shape)}, "
                f"got {kernel_frozen.shape} and {bias_frozen.shape}"
            )
        self.kernel_trainable.assign((~kernel_frozen).astype(np.float32))
        self.bias_trainable.assign((~bias_frozen).astype(np.float32))

    def effective_kernel(self):
        """The kernel the layer computes with: absent connections are 0."""
        return self.kernel * self._expand(self.connectivity)

    def gradient_masks(self) -> list[tuple[object, object]]:
        """[(kernel, its 0/1 gradient multiplier), (bias, its multiplier)], broadcastable."""
        return [
            (self.kernel, self._expand(self.kernel_trainable)),
            (self.bias, self.bias_trainable),
        ]

    def _expand(self, per_connection):
        return per_connection


@keras.saving.register_keras_serializable(package="dgm_tf")
class SparseMaskedDense(_SparseMaskedMixin, keras.layers.Layer):
    """Fully connected layer ``y = x @ (kernel * connectivity) + bias``.

    ``connectivity`` has the kernel's Keras layout ``(in, units)``. No activation: the
    networks apply ReLU themselves so they can read the units' activations.

    Args:
        units: Output units.
        kernel_initializer: Initializer of the kernel (the NISPA networks overwrite it
            with Kaiming-normal fan-out values drawn from an explicit generator).

    Example:
        >>> layer = SparseMaskedDense(4)
        >>> layer.build((None, 3))
        >>> layer.set_connectivity(np.eye(3, 4, dtype=bool))
        >>> y = layer(tf.ones([2, 3]))  # each output reads at most one input

    Reference:
        Gurbuz & Dovrolis, arXiv 2206.09117; BurakGurbuz97/NISPA, NISPA/NISPA/model.py,
        ``MaskedLinearDynamic``.
    """

    def __init__(self, units: int, kernel_initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        if self.units < 1:
            raise ValueError(f"units must be >= 1, got {units}")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        in_features = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(in_features, self.units), initializer=self.kernel_initializer
        )
        # Biases start at 0 (the reference's re_initialize sets them to 0) and are never pruned.
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self._add_mask_state((in_features, self.units), self.units)

    def call(self, inputs):
        kernel = tf.cast(self.effective_kernel(), self.compute_dtype)
        return tf.matmul(inputs, kernel) + tf.cast(self.bias, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="dgm_tf")
class SparseMaskedConv2D(_SparseMaskedMixin, keras.layers.Layer):
    """2D convolution (stride 1) whose kernels exist or not per (input, output) channel.

    ``connectivity`` is ``(in_channels, filters)``: entry (i, o) switches the whole
    ``kernel_size x kernel_size`` kernel from input channel i to output channel o, as the
    reference's channel-wise pruning does (NISPA/NISPA/model.py, ``random_prune``).
    Freezing is per kernel too (``kernel_trainable`` has the same shape).

    Args:
        filters: Output channels.
        kernel_size: Square kernel size.
        padding: ``"same"`` (the NISPA ConvNet: 3x3, padding 1) or ``"valid"``.
        kernel_initializer: Initializer of the kernel.

    Reference:
        Gurbuz & Dovrolis, arXiv 2206.09117; BurakGurbuz97/NISPA, NISPA/NISPA/model.py,
        ``MaskedConv2dDynamic``.
    """

    def __init__(self, filters: int, kernel_size: int = 3, padding: str = "same",
                 kernel_initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        if self.filters < 1 or self.kernel_size < 1:
            raise ValueError(f"filters and kernel_size must be >= 1, got {filters}, {kernel_size}")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.padding = padding
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        k = self.kernel_size
        self.kernel = self.add_weight(
            name="kernel", shape=(k, k, in_channels, self.filters), initializer=self.kernel_initializer
        )
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        self._add_mask_state((in_channels, self.filters), self.filters)

    def _expand(self, per_connection):
        # (in, out) -> (1, 1, in, out): one value per whole kernel.
        return per_connection[None, None, :, :]

    def call(self, inputs):
        kernel = tf.cast(self.effective_kernel(), self.compute_dtype)
        outputs = tf.nn.conv2d(inputs, kernel, strides=1, padding=self.padding.upper())
        return outputs + tf.cast(self.bias, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        if self.padding == "valid":
            shrink = self.kernel_size - 1
            h = None if h is None else h - shrink
            w = None if w is None else w - shrink
        return (n, h, w, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            padding=self.padding,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


SPARSE_MASKED_LAYERS = (SparseMaskedDense, SparseMaskedConv2D)


def mask_frozen_gradients(grads: Sequence, variables: Sequence, layers: Iterable) -> list:
    """Multiply the gradients of frozen parameters by 0 (the others by 1).

    ``variables`` are matched to the layers' kernels and biases by identity; gradients
    of other variables (or ``None`` gradients) pass unchanged. With Adam re-created at
    every phase (as NISPA does), a parameter whose gradient is always 0 keeps its value
    bit for bit (m = v = 0, so the update is 0). Follows BurakGurbuz97/NISPA,
    NISPA/NISPA/training.py, ``reset_frozen_gradients``.
    """
    multipliers = {}
    for layer in layers:
        for variable, multiplier in layer.gradient_masks():
            multipliers[id(variable)] = multiplier
    masked = []
    for grad, variable in zip(grads, variables):
        multiplier = multipliers.get(id(variable))
        if grad is None or multiplier is None:
            masked.append(grad)
        else:
            masked.append(grad * tf.cast(multiplier, grad.dtype))
    return masked
