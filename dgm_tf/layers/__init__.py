"""Task-masked, growable Keras layers."""

from dgm_tf.layers.class_heads import ClassOutputHeads
from dgm_tf.layers.replica_batch_norm import ReplicaBatchNormalization
from dgm_tf.layers.task_batch_norm import TaskBatchNormalization
from dgm_tf.layers.task_masked_conv import (
    OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS,
    TaskMaskedConv2DTranspose,
)

__all__ = [
    "ClassOutputHeads",
    "OLD_TASK_EMBEDDING_ON_NEW_WEIGHTS",
    "ReplicaBatchNormalization",
    "TaskBatchNormalization",
    "TaskMaskedConv2DTranspose",
]
