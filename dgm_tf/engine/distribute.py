"""The one place that knows which ``tf.distribute`` strategy runs an experiment.

``--distribution=none`` runs on the default strategy (one device; nothing here is
entered, so nothing changes). ``mirrored`` is TensorFlow's ``MirroredStrategy``: every
GPU of this host (the CPU when there is none). ``multi_worker`` is its
``MultiWorkerMirroredStrategy``, the cluster and this process's place in it read from
``TF_CONFIG`` as TensorFlow's multi-worker guide describes. Both are synchronous and
``--batch_size`` stays the global batch: the engine's loop (``dgm_tf.fit_loop``) hands
every replica the whole batch and the trainers take their rows and write their losses
as per-replica shares (``dgm_tf.replica``), so N replicas make one device's update.
The methods stay unaware of all this: their networks, optimizers and trainers are
created inside the strategy's ``scope()``.

Workers of a ``multi_worker`` cluster run the same experiment on the same data and
build identical variables. Only the chief (``should_checkpoint``: the ``chief`` task,
or worker 0 when the cluster has none) writes the run directory; every other worker
runs the same engine into a private temporary directory, removed when it stops, as
TensorFlow's own guide has non-chief workers do with their checkpoints. A resumed
worker copies the chief's run (flags, results, checkpoints) into its temporary
directory first, so ``--workdir`` must be readable by every worker (a shared file
system) to ``--resume``.
"""

from __future__ import annotations

import json
import os

from dgm_tf.config import Config, ConfigError

# How long a collective may wait for the other workers (seconds). A worker that dies is
# found sooner, by the coordination service's heartbeats (about 20 s measured on
# 127.0.0.1); this bounds a worker that hangs without dying. Generous, because a worker
# legitimately waits at the next collective while the chief writes a checkpoint, a
# sample grid or a SavedModel.
COLLECTIVE_TIMEOUT_S = 600.0


def check_distribution(config: Config) -> None:
    """Refuse, with one line naming the problem, a distribution that cannot start:
    ``multi_worker`` needs a ``TF_CONFIG`` that describes a cluster and this task."""
    if config.distribution != "multi_worker":
        return
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "--distribution=multi_worker: TF_CONFIG is not set; it must describe the cluster and this "
            "worker's task, as TensorFlow's multi-worker guide shows"
        )
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--distribution=multi_worker: TF_CONFIG is not valid JSON ({e})") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError('--distribution=multi_worker: TF_CONFIG has no "cluster" (e.g. {"worker": ["host:port", ...]})')
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError('--distribution=multi_worker: TF_CONFIG has no "task" with "type" and "index"')
    kind, index = task["type"], task["index"]
    if kind not in ("chief", "worker"):
        raise ConfigError(
            f"--distribution=multi_worker: TF_CONFIG task type {kind!r} cannot train; MultiWorkerMirroredStrategy "
            "runs chief and worker tasks"
        )
    members = cluster.get(kind)
    if not isinstance(index, int) or not isinstance(members, list) or not 0 <= index < len(members):
        raise ConfigError(
            f"--distribution=multi_worker: TF_CONFIG task {kind}:{index} is not in its cluster "
            f"({kind}: {members!r})"
        )


def make_strategy(config: Config):
    """The strategy of ``config.distribution`` (None for ``none``). ``multi_worker``
    must be made before TensorFlow runs any op in this process (its collectives are
    configured at program start-up), so the engine makes it first of all."""
    check_distribution(config)
    if config.distribution == "none":
        return None
    import tensorflow as tf
    from absl import logging

    if config.distribution == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    else:
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    logging.info("--distribution=%s: %d replicas in sync (this process: %s)", config.distribution,
                 strategy.num_replicas_in_sync, ", ".join(strategy.extended.worker_devices))
    return strategy


def is_chief(strategy) -> bool:
    """Whether this process writes the run directory: always without a strategy or on
    one host; under ``multi_worker``, the chief only."""
    return strategy is None or bool(strategy.extended.should_checkpoint)


def worker_name(strategy) -> str:
    """``worker 1`` / ``chief``: this process in a multi-worker cluster, for messages."""
    resolver = strategy.cluster_resolver
    return "chief" if resolver.task_type == "chief" else f"{resolver.task_type} {resolver.task_id}"


def cluster_errors() -> tuple[type[Exception], ...]:
    """What a collective raises when another worker stopped or cannot be reached."""
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError)


def replicas_in_sync() -> int:
    """Replicas of the strategy in scope (1 outside any): results.json ``runtime``."""
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
