"""Shared fixtures: small real scenarios from the embedded Fashion-MNIST sample."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dgm_tf import runtime  # noqa: E402

# The suite runs TensorFlow as `python -m dgm_tf.main` does (oneDNN kernels unless
# TF_ENABLE_ONEDNN_OPTS says otherwise); subprocesses inherit the setting.
runtime.prefer_onednn()

import keras  # noqa: E402
import pytest  # noqa: E402

from dgm_tf.data import load_dataset, make_scenario  # noqa: E402


@pytest.fixture(scope="session")
def embedded_raw():
    return load_dataset("embedded")


@pytest.fixture
def tiny_scenario(embedded_raw):
    """Three one-class tasks (trouser, sneaker, bag), 64 training images each."""
    keras.utils.set_random_seed(0)
    return make_scenario(
        embedded_raw, class_order=(1, 7, 8), classes_per_task=1, num_tasks=None,
        train_examples_per_class=64, validation_fraction=0.15, seed=0,
    )
