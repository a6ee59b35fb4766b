"""Transposed convolution gated by a learnable per-task mask on its weights (DGMw) or on
its output channels (DGMa)."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

# Value given to an earlier task's embedding on weights added by growth, so that
# sigmoid(s * e) is exactly 0 for that task at every s >= 1 (reference:
# SAP/machine-learning-dgm, networks/net_DGMw.py, `expand_embeddings`, fill_(-90)).
OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS = -90.0

# What a task embedding gates: every kernel weight (DGMw) or every output channel (DGMa).
MASK_KINDS = ("weight", "activation")


@keras.saving.register_keras_serializable(package="dgm_tf")
class TaskMaskedConv2DTranspose(keras.layers.Layer):
    """2D transposed convolution with a hard-attention mask per task.

    ``mask_kind="weight"`` (DGMw): task ``t`` convolves with
    ``kernel * sigmoid(s * task_embeddings[t])``, one embedding value per kernel weight
    per task. ``mask_kind="activation"`` (DGMa): task ``t`` multiplies the convolution's
    output channels by ``sigmoid(s * task_embeddings[t])``, one embedding value per output
    channel per task (Ostapenko et al., CVPR 2019, Sec. 3.2; the gate is HAT's, Serra et
    al., ICML 2018). Either way the mask has the shape of ``task_embeddings[t]``
    (``mask_shape``). The layer can grow: every task records the
    number of output channels that existed when it was learned (``task_filters``), and
    task ``t`` only uses that slice of the kernel, so channels added later never change
    an earlier task's output.

    Keras 3 locks a built layer's state, so growth makes a *new* layer from a grown
    config and copies this one's weights into it (``load_grown_weights``); see
    ``grown_config``.

    Args:
        filters: Current number of output channels (the widest task).
        kernel_size: Square kernel size.
        strides: Stride (int).
        padding: ``"valid"`` or ``"same"``.
        task_filters: Output channels used by each task, one entry per task (the
            embedding table has ``len(task_filters)`` rows). The last entry must equal
            ``filters``. Defaults to ``(filters,)``: one task using everything.
        kernel_initializer: Initializer of the kernel (for a grown layer, of the new
            weights only; the old ones are copied).
        mask_kind: ``"weight"`` (DGMw) or ``"activation"`` (DGMa), see above.
        dtype: Keras dtype policy. Under ``mixed_bfloat16`` the kernel, embeddings and
            the gate are computed in float32 (s reaches 1e5, beyond bf16's 8-bit
            mantissa); the convolution (with the masked kernel, or followed by the
            multiplication with the channel gate) runs in bfloat16. Inputs are never
            auto-cast (``autocast=False``) so that ``s`` arrives in float32.

    Example:
        >>> conv = TaskMaskedConv2DTranspose(8, 4, strides=2, padding="same")
        >>> y = conv(tf.zeros([2, 4, 4, 3]), task=0, s=1.0)  # [2, 8, 8, 8]

    Reference:
        Ostapenko et al., "Learning to Remember: A Synaptic Plasticity Driven Framework
        for Continual Learning", CVPR 2019; SAP/machine-learning-dgm,
        networks/net_DGMw.py (Plastic_ConvTranspose2d).
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        strides: int = 1,
        padding: str = "valid",
        task_filters: Sequence[int] | None = None,
        kernel_initializer="glorot_uniform",
        mask_kind: str = "weight",
        **kwargs,
    ):
        kwargs["autocast"] = False  # dtypes handled explicitly in call()
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.padding = padding
        self.task_filters = tuple(int(f) for f in (task_filters or (filters,)))
        if self.task_filters[-1] != self.filters or any(
            b < a for a, b in zip(self.task_filters, self.task_filters[1:])
        ):
            raise ValueError(
                f"task_filters must be non-decreasing and end at filters={filters}, "
                f"got {self.task_filters}"
            )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        if mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
        self.mask_kind = mask_kind

    @property
    def num_tasks(self) -> int:
        return len(self.task_filters)

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        k = self.kernel_size
        # Keras layout for transposed convolutions: (kh, kw, out_channels, in_channels).
        self.kernel = self.add_weight(
            name="kernel",
            shape=(k, k, self.filters, in_channels),
            initializer=self.kernel_initializer,
        )
        # One real value per kernel weight (or output channel) per task, initialised to
        # 0 (reference: `self.ec.weight.data.fill_(0)` in net_DGMw.py and net_DGMa.py).
        # One variable per task (the reference keeps one table): training task t touches
        # only its own row, so the optimizer and the HAT compensation need not visit the
        # frozen rows of earlier tasks.
        self.task_embeddings = [
            self.add_weight(name=f"task_embedding_{t}", shape=self.mask_shape, initializer="zeros")
            for t in range(self.num_tasks)
        ]

    @property
    def input_channels(self) -> int:
        return int(self.kernel.shape[-1])

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape of one task's mask: the kernel's (k, k, out, in), or (out,)."""
        if self.mask_kind == "activation":
            return (self.filters,)
        return tuple(int(d) for d in self.kernel.shape)

    def mask(self, task: int, s) -> tf.Tensor:
        """sigmoid(s * e_task) over the full current mask shape."""
        embedding = self.task_embeddings[task]
        return tf.sigmoid(tf.cast(s, embedding.dtype) * embedding)

    def call(self, inputs, task: int, s):
        out_w = self.task_filters[task]
        in_w = int(inputs.shape[-1])
        kernel = self.kernel[:, :, :out_w, :in_w]
        embedding = self.task_embeddings[task]
        if self.mask_kind == "activation":
            outputs = keras.ops.conv_transpose(
                tf.cast(inputs, self.compute_dtype),
                tf.cast(kernel, self.compute_dtype),
                strides=self.strides,
                padding=self.padding,
            )
            # The gate multiplies the output before BatchNorm (reference:
            # networks/net_DGMa.py, netG.forward: x = x * gc1[:, :cap]).
            gate = tf.sigmoid(tf.cast(s, embedding.dtype) * embedding[:out_w])
            return outputs * tf.cast(gate, self.compute_dtype)
        gate = tf.sigmoid(tf.cast(s, kernel.dtype) * embedding[:, :, :out_w, :in_w])
        return keras.ops.conv_transpose(
            tf.cast(inputs, self.compute_dtype),
            tf.cast(kernel * gate, self.compute_dtype),
            strides=self.strides,
            padding=self.padding,
        )

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        if self.padding == "same":
            size = lambda d: None if d is None else d * self.strides
        else:
            size = lambda d: None if d is None else (d - 1) * self.strides + self.kernel_size
        return (n, size(h), size(w), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            task_filters=list(self.task_filters),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            mask_kind=self.mask_kind,
        )
        return config

    def grown_config(self, add_outputs: int, growth_initializer) -> dict:
        """Config of this layer after one more task and ``add_outputs`` more channels.

        The new task uses every channel, old and new. Input growth is implied by the
        input shape the new layer is built with.
        """
        config = self.get_config()
        filters = self.filters + int(add_outputs)
        config.update(
            filters=filters,
            task_filters=list(self.task_filters) + [filters],
            kernel_initializer=keras.initializers.serialize(
                keras.initializers.get(growth_initializer)
            ),
        )
        return config

    def load_grown_weights(self, old: "TaskMaskedConv2DTranspose") -> None:
        """Copy ``old``'s weights into this (wider, built) layer.

        The old kernel goes into the leading slice; new weights keep this layer's fresh
        initialisation. Every task ``old`` knew keeps its embedding on the old weights
        (channels) and gets -90 on the new ones; tasks ``old`` did not know keep 0
        everywhere.
        """
        old_k = old.kernel.numpy()
        k, _, o, i = old_k.shape
        if not (self.filters >= o and self.input_channels >= i and self.num_tasks >= old.num_tasks):
            raise ValueError("load_grown_weights needs a layer at least as large as the old one")
        if self.mask_kind != old.mask_kind:
            raise ValueError(f"cannot grow a {old.mask_kind}-masked layer into a {self.mask_kind}-masked one")
        kernel = self.kernel.numpy()
        kernel[:, :, :o, :i] = old_k
        self.kernel.assign(kernel)
        old_slice = tuple(slice(0, int(d)) for d in old.mask_shape)
        for t, old_embedding in enumerate(old.task_embeddings):
            emb = np.full(self.mask_shape, OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS, np.float32)
            emb[old_slice] = old_embedding.numpy()
            self.task_embeddings[t].assign(emb)
