"""Batch normalisation whose batch statistics are those of the global batch."""

from __future__ import annotations

import threading

import keras
from keras import ops

from dgm_tf.replica import replicas

_CALL = threading.local()


@keras.saving.register_keras_serializable(package="dgm_tf")
class ReplicaBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` that normalises by the moments of the global
    batch when it runs on several synchronous replicas, and is the plain layer otherwise.

    Under a ``tf.distribute`` strategy each replica sees 1/N of the batch: local moments
    would make every replica's normalisation and moving statistics differ from one
    device's (the moving-statistics copies drifted apart by 1e-2 in our measurement).
    Keras's ``synchronized=True`` all-reduces the moments but, always on, tripled the
    one-device trace time and changes one device's float rounding; here it is chosen at
    trace time from the replica context, so one device runs the unchanged op.
    """

    def call(self, inputs, training=None, mask=None, whole_batch=False):
        """``whole_batch``: every replica holds the whole global batch (not a share of
        it), so its own moments are the global batch's. DGM's gradient penalty runs
        this way: TensorFlow's second-order gradient through the all-reduced moments is
        wrong (measured: critic gradients off by 2-10 %, WORKSPACE.md)."""
        # MirroredStrategy traces the replicas in parallel threads: the flag is the
        # calling thread's, for the length of this call (set at trace time).
        before = getattr(_CALL, "whole_batch", False)
        _CALL.whole_batch = bool(whole_batch)
        try:
            return super().call(inputs, training=training, mask=mask)
        finally:
            _CALL.whole_batch = before

    def _moments(self, inputs, mask):
        if mask is None and not self.synchronized and not getattr(_CALL, "whole_batch", False) and replicas() > 1:
            return ops.moments(inputs, axes=self._reduction_axes, synchronized=True)
        return super()._moments(inputs, mask)
