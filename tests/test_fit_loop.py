"""fit_epochs: the callbacks in fit's order, one trace per trainer, no AutoGraph."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dgm_tf.fit_loop import _train_function, fit_epochs


class Counting(keras.Model):
    """A one-weight trainer whose step adds the batch sum to ``total``."""

    def __init__(self):
        super().__init__()
        self.total = tf.Variable(0.0)
        self.traces = 0

    def train_step(self, data):
        self.traces += 1  # Python: runs once per trace
        self.total.assign_add(tf.reduce_sum(data))
        return {"total": tf.identity(self.total)}


class Branching(Counting):
    """A step that branches on a tensor in Python: needs AutoGraph to trace."""

    def train_step(self, data):
        if tf.reduce_sum(data) > 0:
            self.total.assign_add(1.0)
        return {"total": tf.identity(self.total)}


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_begin(self, logs=None):
        self.events.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(f"epoch_begin {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(f"batch_end {batch} {float(logs['total']):g}")

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(f"epoch_end {epoch} {float(logs['total']):g}")

    def on_train_end(self, logs=None):
        self.events.append("train_end")


def batches(epoch):
    # 5 values in batches of 2: the last batch is shorter and must not retrace.
    return tf.data.Dataset.from_tensor_slices(np.arange(5, dtype=np.float32) + 10 * epoch).batch(2)


def test_epochs_run_every_batch_in_fits_callback_order_with_one_trace():
    trainer, recorder = Counting(), Recorder()
    fit_epochs(trainer, batches, initial_epoch=1, epochs=3, callbacks=[recorder])
    # Epoch 1: 10..14 (sums 21, 25, 14); epoch 2: 20..24 (41, 45, 24).
    assert recorder.events == [
        "train_begin", "epoch_begin 1", "batch_end 0 21", "batch_end 1 46", "batch_end 2 60", "epoch_end 1 60",
        "train_end",
        "train_begin", "epoch_begin 2", "batch_end 0 101", "batch_end 1 146", "batch_end 2 170", "epoch_end 2 170",
        "train_end",
    ]
    assert float(trainer.total.numpy()) == 170.0
    assert trainer.traces == 1


def test_the_step_is_traced_without_autograph():
    # fit_loop traces without AutoGraph (its comment has the measurement): a Python
    # branch on a tensor is refused when the step is traced, never silently converted.
    trainer = Branching()
    with pytest.raises((TypeError, tf.errors.OperatorNotAllowedInGraphError)):
        _train_function(trainer)(iter(batches(0)))
    assert float(trainer.total.numpy()) == 0.0
