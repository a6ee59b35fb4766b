"""The DGM generator: task-masked transposed convolutions (weight or activation masks),
per-task BN, output heads per class (DGMw) or per task (DGMa)."""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from dgm_tf.layers import ClassOutputHeads, TaskBatchNormalization, TaskMaskedConv2DTranspose

KERNEL_SIZE = 4
NUM_MASKED_LAYERS = 3


def _xavier_relu():
    """Xavier-uniform with ReLU gain sqrt(2) (reference: utils/utils.py ``weights_init_g``)."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_avg", distribution="uniform")


def _normal_002():
    """N(0, 0.02) (reference: utils/utils.py ``weights_init`` for convolutions)."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=0.02)


def initial_kernel_initializer(mask_kind: str = "weight"):
    """Kernel init of the first task's generator.

    DGMw: Xavier-uniform with ReLU gain (net_DGMw.py applies ``weights_init_g``). DGMa:
    N(0, 0.02) (net_DGMa.py's netG ends its constructor with ``self.apply(weights_init)``).
    """
    return _xavier_relu() if mask_kind == "weight" else _normal_002()


def growth_kernel_initializer(mask_kind: str = "weight"):
    """Init of weights added by growth: the reverse of the initial one in the reference.

    DGMw: N(0, 0.02) (``Plastic_ConvTranspose2d.expand`` re-applies ``weights_init``).
    DGMa: Xavier-uniform with ReLU gain over the grown kernel (net_DGMa.py
    ``ConvTranspose2d.extand`` applies ``weights_init_g``).
    """
    return _normal_002() if mask_kind == "weight" else _xavier_relu()


def activation_growth_channels(newly_reserved: Sequence[int]) -> tuple[int, ...]:
    """DGMa: each layer gains as many output channels as the last task newly reserved
    (reference: approaches/DGMa.py ``extand_layers``)."""
    return tuple(int(n) for n in newly_reserved)


def growth_channels(
    newly_reserved: Sequence[int], widths: Sequence[int], nz: int, kernel_size: int = KERNEL_SIZE
) -> tuple[int, int, int]:
    """Output channels to add to each masked layer so the free capacity stays constant.

    Layer ``l`` must gain at least ``newly_reserved[l]`` weights. Layer 1 (input ``nz``)
    gains ceil(n1 / (nz*k*k)) output channels. Layers 2 and 3 first gain weights from
    their grown input (the previous layer's new channels times their old output
    width); only what is still missing is added as output channels, rounded up
    (reference: networks/net_DGMw.py ``netG.extand``).

    Args:
        newly_reserved: Weights newly reserved by the last task, per masked layer.
        widths: Current output channels of the three masked layers.
        nz: Noise size (the first layer's input channels).
    """
    area = kernel_size * kernel_size
    n1, n2, n3 = (int(n) for n in newly_reserved)
    w1, w2, w3 = (int(w) for w in widths)
    add1 = math.ceil(n1 / (nz * area))
    new_in2 = w1 + add1
    add2 = max(math.ceil((n2 - add1 * w2 * area) / (new_in2 * area)), 0)
    new_in3 = w2 + add2
    add3 = max(math.ceil((n3 - add2 * w3 * area) / (new_in3 * area)), 0)
    return add1, add2, add3


@keras.saving.register_keras_serializable(package="dgm_tf")
class Generator(keras.Model):
    """Conditional DCGAN generator with DGM task masks (32x32 images in [-1, 1]).

    ``z`` (size ``nz``) carries a one-hot class code in its first ``num_code_classes``
    entries. Three 4x4 transposed convolutions (1->4->8->16 spatial, widths 4·ngf,
    2·ngf, ngf initially, no bias), each masked per task, followed by that task's
    BatchNorm and ReLU; then an output head and tanh. With weight masks (DGMw) every
    class has its own head (reference: approaches/DGMw.py appends one per class); with
    activation masks (DGMa) every task has one, shared by its classes (approaches/DGMa.py
    appends one per task).

    The architecture is fully described by its config: ``task_widths[t]`` are the three
    layer widths task ``t`` uses, ``task_classes[t]`` its model labels. ``grown`` returns
    the generator after a task ends (one more task, wider layers, new heads).

    Args:
        nz: Noise size.
        num_code_classes: Size of the one-hot class code (all classes of the scenario).
        image_channels: 1 (grayscale) or 3 (RGB).
        task_widths: Per task, the output channels of the three masked layers.
        task_classes: Per task, the model labels of its classes.
        mask_kind: ``"weight"`` (DGMw) or ``"activation"`` (DGMa).
        dtype: Keras dtype policy (``"float32"`` or ``"mixed_bfloat16"``), given to every
            layer. Variables, masks, noise and BN statistics stay float32; images come
            out float32 whatever the policy.

    Reference:
        Ostapenko et al., CVPR 2019; SAP/machine-learning-dgm, networks/net_DGMw.py.
    """

    def __init__(
        self,
        nz: int,
        num_code_classes: int,
        image_channels: int,
        task_widths: Sequence[Sequence[int]],
        task_classes: Sequence[Sequence[int]],
        mask_kind: str = "weight",
        **kwargs,
    ):
        # No input auto-cast: s must reach the masks in float32 (see the layers).
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.nz = int(nz)
        self.num_code_classes = int(num_code_classes)
        self.image_channels = int(image_channels)
        self.task_widths = tuple(tuple(int(w) for w in ws) for ws in task_widths)
        self.task_classes = tuple(tuple(int(c) for c in cs) for cs in task_classes)
        self.mask_kind = mask_kind
        if len(self.task_widths) != len(self.task_classes) or not self.task_widths:
            raise ValueError("task_widths and task_classes need one entry per task")
        if self.nz < self.num_code_classes:
            raise ValueError(f"nz={nz} must be >= the number of classes {num_code_classes}")
        labels = [c for cs in self.task_classes for c in cs]
        if labels != list(range(len(labels))):
            raise ValueError(f"task classes must be labels 0, 1, 2, ... in order, got {labels}")

        first = self.num_tasks == 1
        kernel_init = initial_kernel_initializer(mask_kind) if first else growth_kernel_initializer(mask_kind)
        # The reference re-initialises only the first task's BatchNorms with N(1, 0.02)
        # (weights_init); later tasks' BatchNorms keep the default of its pinned PyTorch
        # 1.0, gamma ~ U(0, 1) (ones only from PyTorch 1.2 on).
        gamma_init = (
            keras.initializers.RandomNormal(1.0, 0.02) if first else keras.initializers.RandomUniform(0.0, 1.0)
        )
        per_layer = list(zip(*self.task_widths))
        specs = [(1, "valid"), (2, "same"), (2, "same")]
        self.masked_convs = []
        self.batch_norms = []
        for l, (stride, padding) in enumerate(specs):
            self.masked_convs.append(
                TaskMaskedConv2DTranspose(
                    filters=per_layer[l][-1],
                    kernel_size=KERNEL_SIZE,
                    strides=stride,
                    padding=padding,
                    task_filters=per_layer[l],
                    kernel_initializer=kernel_init,
                    mask_kind=mask_kind,
                    name=f"conv{l + 1}",
                    dtype=self.dtype_policy,
                )
            )
            self.batch_norms.append(
                TaskBatchNormalization(
                    per_layer[l], gamma_initializer=gamma_init, name=f"bn{l + 1}", dtype=self.dtype_policy
                )
            )
        if self.head_per_task:
            head_inputs = [widths[-1] for widths in self.task_widths]
        else:
            head_inputs = [self.task_widths[t][-1] for t, cs in enumerate(self.task_classes) for _ in cs]
        self.heads = ClassOutputHeads(head_inputs, self.image_channels, name="heads", dtype=self.dtype_policy)
        self.build((None, self.nz))

    @property
    def num_tasks(self) -> int:
        return len(self.task_widths)

    @property
    def head_per_task(self) -> bool:
        """One output head per task (DGMa) instead of one per class (DGMw)."""
        return self.mask_kind == "activation"

    def _heads_of(self, task: int) -> tuple[int, ...]:
        return (task,) if self.head_per_task else self.task_classes[task]

    @property
    def widths(self) -> tuple[int, int, int]:
        """Current (widest) output channels of the masked layers."""
        return self.task_widths[-1]

    def build(self, input_shape):
        shape = (None, 1, 1, self.nz)
        for conv, bn in zip(self.masked_convs, self.batch_norms):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            bn.build(shape)
        self.heads.build(shape)
        self.built = True

    def call(self, z, labels, task: int, s, training=None):
        """Images [N, 32, 32, C] of classes ``labels`` for ``task`` at mask scale ``s``."""
        x = tf.reshape(z, [-1, 1, 1, self.nz])
        for conv, bn in zip(self.masked_convs, self.batch_norms):
            x = conv(x, task=task, s=s)
            x = bn(x, task=task, training=training)
            x = tf.nn.relu(x)
        x = self.heads(x, labels=labels, classes=self._heads_of(task))
        return tf.cast(tf.tanh(x), tf.float32)

    def masks(self, task: int, s) -> list[tf.Tensor]:
        """Task ``task``'s masks sigmoid(s·e) of the three layers, full current shapes
        (kernel-shaped for weight masks, one value per channel for activation masks)."""
        return [conv.mask(task, s) for conv in self.masked_convs]

    def task_of_label(self, label: int) -> int:
        for t, cs in enumerate(self.task_classes):
            if label in cs:
                return t
        raise ValueError(f"label {label} belongs to no task of this generator")

    def task_trainable_variables(self, task: int) -> list:
        """What training ``task`` may change: kernels, embeddings, its BN and heads."""
        variables = []
        for conv, bn in zip(self.masked_convs, self.batch_norms):
            variables += [conv.kernel, conv.task_embeddings[task]]
            variables += bn.task_variables(task)
        variables += [self.heads.kernels[h] for h in self._heads_of(task)]
        return variables

    def noise(self, labels, rng: tf.random.Generator) -> tf.Tensor:
        """N(0, 1) noise whose first entries are the one-hot code of ``labels``
        (reference: approaches/DGMw.py ``generate_noise``)."""
        labels = tf.convert_to_tensor(labels)
        n = tf.shape(labels)[0]
        z = rng.normal([n, self.nz])
        code = tf.one_hot(labels, self.num_code_classes, dtype=z.dtype)
        return tf.concat([code, z[:, self.num_code_classes :]], axis=1)

    def parameter_count(self) -> int:
        """Weights of the generator (kernels, BN scales/offsets, heads; no embeddings)."""
        return int(
            sum(
                np.prod(v.shape)
                for v in self.trainable_variables
                if "task_embedding" not in v.path
            )
        )

    def get_config(self):
        return {
            "name": self.name,
            "nz": self.nz,
            "num_code_classes": self.num_code_classes,
            "image_channels": self.image_channels,
            "task_widths": [list(w) for w in self.task_widths],
            "task_classes": [list(c) for c in self.task_classes],
            "mask_kind": self.mask_kind,
            "dtype": self.dtype_policy.name,
        }

    def grown(self, add_channels: Sequence[int], new_task_classes: Sequence[int]) -> "Generator":
        """A new generator with one more task, wider layers and heads for its classes.

        Every earlier task's output is unchanged: its layers read only the channels it
        had, its embeddings are -90 on the new weights, and its BatchNorms and heads are
        copied.
        """
        new_widths = tuple(w + int(a) for w, a in zip(self.widths, add_channels))
        grown = Generator(
            nz=self.nz,
            num_code_classes=self.num_code_classes,
            image_channels=self.image_channels,
            task_widths=self.task_widths + (new_widths,),
            task_classes=self.task_classes + (tuple(new_task_classes),),
            mask_kind=self.mask_kind,
            name=self.name,
            dtype=self.dtype_policy.name,
        )
        for new, old in zip(grown.masked_convs, self.masked_convs):
            new.load_grown_weights(old)
        for new, old in zip(grown.batch_norms, self.batch_norms):
            new.load_grown_weights(old)
        grown.heads.load_grown_weights(self.heads)
        return grown
