"""The one place that knows which ``tf.distribute`` strategy runs an experiment.

``--distribution=none`` runs on the default strategy (one device; nothing here is
entered, so nothing changes). ``mirrored`` is TensorFlow's ``MirroredStrategy``: every
GPU of this host (the CPU when there is none), synchronous, ``--batch_size`` the global
batch that Keras's ``fit`` splits among the replicas. The methods stay unaware of it:
their networks, optimizers and trainers are created inside ``scope()`` (so their
variables are mirrored), and their losses are written as per-replica shares
(``dgm_tf.replica``) that sum to one device's update.

``multi_worker`` (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``) and DGM under a
strategy are not available yet: they need a training loop of our own (Keras 3's ``fit``
fails under MultiWorkerMirroredStrategy, keras#20585) and DGM's replay-classifier
chunks in cross-replica context (WORKSPACE.md, "More than one device"). Asking for them
is refused with one line before any data is read.
"""

from __future__ import annotations

import contextlib
import os

from dgm_tf.config import DGM_METHODS, Config, ConfigError


def check_distribution(config: Config) -> None:
    """Refuse, with one line naming the flag, a distribution this build cannot run."""
    if config.distribution == "none":
        return
    if config.distribution == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError(
                "--distribution=multi_worker: TF_CONFIG is not set; it must describe the cluster and this "
                "worker's task, as TensorFlow's multi-worker guide shows"
            )
        raise ConfigError(
            "--distribution=multi_worker is not available yet (Keras's fit() fails under "
            "MultiWorkerMirroredStrategy); use --distribution=mirrored on one host"
        )
    if config.method in DGM_METHODS:
        raise ConfigError(
            f"--distribution={config.distribution} is not available for {config.method} yet; "
            "finetune, joint and mas support --distribution=mirrored"
        )


def strategy_scope(config: Config) -> contextlib.AbstractContextManager:
    """The scope every network, optimizer and trainer of the run is created in: the
    strategy's, or nothing for ``none``."""
    check_distribution(config)
    if config.distribution == "none":
        return contextlib.nullcontext()
    import tensorflow as tf
    from absl import logging

    strategy = tf.distribute.MirroredStrategy()
    logging.info("--distribution=%s: %d replicas (%s)", config.distribution, strategy.num_replicas_in_sync,
                 ", ".join(strategy.extended.worker_devices))
    return strategy.scope()


def replicas_in_sync() -> int:
    """Replicas of the strategy in scope (1 outside any): results.json ``runtime``."""
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
