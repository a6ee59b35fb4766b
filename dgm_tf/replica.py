"""Losses that give the same update on one device and on N synchronous replicas.

Under a ``tf.distribute`` strategy each replica runs the training step on its share of
the global batch and Keras's ``apply_gradients`` sums the replicas' gradients. A loss
written as a per-replica mean therefore counts N times (measured: N = 2 doubles the
step). The trainers write every loss through these helpers instead, which read the
*current replica context*: with no strategy (the default context, one replica) they add
no op and change no number, so a method never asks which strategy runs it.

* a per-sample term: ``sum over this replica's samples / global_count``;
* a batch-free term (a regulariser, a penalty on the weights): ``term / replicas()``,
  so the replicas' sum adds it once;
* a value for the logs: ``replica_sum`` of the replicas' shares, the global figure.

The engine's loop (``dgm_tf.fit_loop``) hands every replica the *whole* global batch;
a trainer takes its rows with ``local_share`` and draws its random numbers with
``shared_draw``, so N replicas see exactly one device's batch and draws (DGM's replay
chunks mix real and replayed rows of the global batch, which a split by the input
pipeline could not give each replica).
"""

from __future__ import annotations

import tensorflow as tf

_SUM = tf.distribute.ReduceOp.SUM


def replicas() -> int:
    """Replicas in sync in the current context (1 without a strategy)."""
    return tf.distribute.get_replica_context().num_replicas_in_sync


def replica_sum(value):
    """Sum of ``value`` (a tensor or a nest of tensors) over the replicas; the value
    itself, with no op added, when there is one replica."""
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(_SUM, value)


def global_count(batch) -> tf.Tensor:
    """Samples in the global batch (float32): this replica's batch size summed."""
    return replica_sum(tf.cast(tf.shape(batch)[0], tf.float32))


def global_mean(per_sample: tf.Tensor, count: tf.Tensor | None = None) -> tf.Tensor:
    """This replica's share of the mean of ``per_sample`` over the global batch: the
    replicas' shares sum to the one-device mean (``count``: ``global_count``, if
    already computed)."""
    if replicas() == 1:
        return tf.reduce_mean(per_sample)  # the one-device op: not a bit changes
    if count is None:
        count = global_count(per_sample)
    return tf.reduce_sum(per_sample) / count


def batch_free(term: tf.Tensor) -> tf.Tensor:
    """This replica's share of a term that does not depend on the batch."""
    n = replicas()
    return term if n == 1 else term / n


def per_replica(fn, *args):
    """``fn(*args)`` where gradients of mirrored variables can be taken.

    Gradient work outside a training step (MAS importance after a task) runs in the
    engine's cross-replica context when a strategy is in scope, where a mirrored
    variable cannot be differentiated. There it runs on every replica with the same
    inputs, and the first replica's result (all are equal) is returned; elsewhere
    (no strategy, or inside a step) ``fn`` is simply called.
    """
    if not tf.distribute.in_cross_replica_context():
        return fn(*args)
    strategy = tf.distribute.get_strategy()
    out = strategy.run(fn, args)
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], out)


def replica_index() -> tuple[int | tf.Tensor, int]:
    """``(index, count)`` of this replica in the whole job (all workers); ``(0, 1)``
    without a strategy."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: the caller acts for every replica
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def local_share(values):
    """This replica's rows of every tensor of ``values`` (a nest; batch on axis 0):
    rows ``[r B / N, (r + 1) B / N)`` of a batch of B, so the N shares partition it in
    order (a share may be empty when B < N). The values themselves, with no op added,
    on one replica."""
    index, count = replica_index()
    if count == 1:
        return values

    def share(x):
        b = tf.shape(x)[0]
        return x[(index * b) // count : ((index + 1) * b) // count]

    return tf.nest.map_structure(share, values)


def shared_draw(fn):
    """``fn()`` (random draws from a ``tf.random.Generator`` made in the strategy's
    scope) run once for all replicas, every replica receiving the same values: the
    values one device draws, in the same order. Under a strategy a generator called in
    replica context gives each replica a stream of its own instead."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return fn()
    return context.merge_call(lambda strategy: fn())


def update_weighted_mean(metric, values: tf.Tensor, weights: tf.Tensor) -> None:
    """``metric.update_state(values, sample_weight=weights)`` over the global batch:
    on several replicas the weighted sum and the weight are summed over them first, so
    the metric holds the global batch's weighted mean (the same on every replica)."""
    if replicas() == 1:
        metric.update_state(values, sample_weight=weights)
        return
    total, weight = replica_sum((tf.reduce_sum(values * weights), tf.reduce_sum(weights)))
    metric.update_state(tf.math.divide_no_nan(total, weight), sample_weight=weight)
