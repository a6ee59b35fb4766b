"""Process-level runtime choices: oneDNN preference and the tf.data epoch pipeline."""

import os

import numpy as np
import tensorflow as tf

from dgm_tf import runtime
from dgm_tf.methods.base import epoch_pipeline


def test_prefer_onednn_sets_a_default_and_keeps_the_users_choice():
    env = {}
    runtime.prefer_onednn(env)
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    env = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    runtime.prefer_onednn(env)
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "0"}


def test_prefer_onednn_says_when_it_is_too_late():
    # This process has imported TensorFlow already, so the choice can no longer apply.
    assert runtime.prefer_onednn({}) is False


def test_the_suite_runs_tensorflow_as_main_does():
    # conftest asks for oneDNN before TensorFlow loads; a user's 0 is honoured.
    assert runtime.onednn_enabled() is (os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1")


def test_epoch_pipeline_turns_autotuning_off_and_keeps_every_batch():
    data = tf.data.Dataset.from_tensor_slices(np.arange(10)).batch(3)
    piped = epoch_pipeline(data)
    assert piped.options().autotune.enabled is False
    assert [b.numpy().tolist() for b in piped] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_every_methods_training_data_goes_through_the_epoch_pipeline(tiny_scenario):
    from dgm_tf.config import Config
    from dgm_tf.methods import make_method

    for name in ("dgmw", "finetune"):
        cfg = Config(method=name, dataset="embedded", class_order=(1, 7, 8), epochs=1,
                     train_examples_per_class=64, batch_size=32, nz=16, ngf=2, ndf=4)
        method = make_method(cfg, tiny_scenario)
        task = tiny_scenario.tasks[0]
        method.begin_task(task)
        assert method.train_dataset(task, 0).options().autotune.enabled is False, name
