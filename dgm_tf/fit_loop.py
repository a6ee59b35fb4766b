"""The training loop every method's trainer runs in: Keras's ``fit`` contract, our loop.

Keras 3's ``fit`` cannot run under ``MultiWorkerMirroredStrategy`` (keras#20585,
tensorflow#72388; reproduced in ../shared/STACK.md), and it splits each batch among the
replicas, where DGM's replay chunks need every replica to see the whole global batch.
So ``fit_epochs`` drives the trainer's ``train_step`` itself, on whatever strategy is in
scope (the default one: one device), and calls the callbacks exactly as ``fit`` does:

* per epoch: ``on_train_begin``, metrics reset, ``on_epoch_begin``, for each batch
  ``on_train_batch_begin`` / step / ``on_train_batch_end``, ``on_epoch_end`` with the
  last step's logs, ``on_train_end`` (one ``fit`` call per epoch was the loop before,
  so every callback sees what it saw then);
* ``model.stop_training`` ends the epoch and the loop;
* the step is traced once per trainer (the trainer is new after growth, so a traced
  step never trains stale variables) and reads the batch from the iterator inside the
  function, so the last, shorter batch does not retrace it.

Every replica receives the whole batch (``strategy.run`` with the batch as a plain
argument) and takes its rows with ``dgm_tf.replica.local_share``; its logs are averaged
over the replicas as ``fit`` does (trainers log global figures, equal on every replica).
On one device the step is the same ops ``fit`` ran, so not a bit changes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf

_MEAN = tf.distribute.ReduceOp.MEAN


def _train_function(trainer: keras.Model) -> Callable:
    """The trainer's traced step (one per trainer, made on first use)."""
    function = getattr(trainer, "_dgm_train_function", None)
    if function is not None:
        return function
    strategy = tf.distribute.get_strategy()

    def one_step(iterator):
        data = next(iterator)
        if strategy.num_replicas_in_sync == 1 and not tf.distribute.has_strategy():
            return trainer.train_step(data)
        outputs = strategy.run(trainer.train_step, args=(data,))
        return tf.nest.map_structure(lambda v: strategy.reduce(_MEAN, v, axis=None), outputs)

    # No AutoGraph: every train_step writes its loops as tf.while_loop and branches only
    # on Python values, so converting its source buys nothing, and the conversion (and
    # the converted_call wrapper around every call inside) was about a third of each
    # first step's time: 15.0-15.9 s against 23.4-26.7 s for DGMw's task-5 step, two
    # interleaved pairs on a 2-core EPYC shared with two training runs, same losses
    # (README, Performance, has the figures on the quiet machine). A tensor used as a
    # Python bool fails loudly at trace time instead of being converted
    # (tests/test_fit_loop.py).
    function = tf.function(one_step, reduce_retracing=True, jit_compile=False, autograph=False)
    trainer._dgm_train_function = function
    return function


def fit_epochs(trainer: keras.Model, dataset_for_epoch: Callable[[int], tf.data.Dataset], initial_epoch: int,
               epochs: int, callbacks: Sequence[keras.callbacks.Callback]) -> None:
    """Epochs ``initial_epoch`` .. ``epochs``-1 of ``trainer.train_step``, each on that
    epoch's dataset (``dataset_for_epoch(epoch)``: global batches, in an order keyed by
    epoch, so a run resumed at any epoch reads what an uninterrupted one reads)."""
    callback_list = keras.callbacks.CallbackList(
        list(callbacks), add_history=False, add_progbar=False, model=trainer, verbose=0, epochs=epochs,
    )
    train_function = _train_function(trainer)
    trainer.stop_training = False
    for epoch in range(initial_epoch, epochs):
        dataset = dataset_for_epoch(epoch)
        steps = int(dataset.cardinality())
        callback_list.params["steps"] = steps if steps >= 0 else None
        callback_list.on_train_begin()
        trainer.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        iterator = iter(dataset)
        logs, step = {}, 0
        while steps < 0 or step < steps:
            callback_list.on_train_batch_begin(step)
            try:
                logs = train_function(iterator)
            except tf.errors.OutOfRangeError:  # a dataset of unknown length ended
                break
            callback_list.on_train_batch_end(step, logs)
            step += 1
            if trainer.stop_training:
                break
        callback_list.on_epoch_end(epoch, dict(logs))
        callback_list.on_train_end(logs=dict(logs))
        if trainer.stop_training:
            break
