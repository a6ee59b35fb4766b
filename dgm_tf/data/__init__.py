"""Data layer: dataset sources and the class-incremental split into tasks.

Typical use::

    raw = load_dataset("embedded")  # or idx:<dir>, npz:<file>, folder:<dir>, tfds:<name>
    scenario = make_scenario(raw, class_order=None, classes_per_task=2, num_tasks=None)
    for task in scenario.tasks:
        ...  # task.x_train float32 [n, 32, 32, C] in [-1, 1], task.y_train int32 model labels
"""

from dgm_tf.data.scenario import (
    Scenario,
    TaskData,
    fingerprint_differences,
    make_scenario,
    resolve_class_order,
    scenario_fingerprint,
    to_model_images,
)
from dgm_tf.data.sources import (
    FASHION_MNIST_CLASS_NAMES,
    DataError,
    RawDataset,
    load_dataset,
)

__all__ = [
    "FASHION_MNIST_CLASS_NAMES",
    "DataError",
    "RawDataset",
    "Scenario",
    "TaskData",
    "fingerprint_differences",
    "load_dataset",
    "make_scenario",
    "resolve_class_order",
    "scenario_fingerprint",
    "to_model_images",
]
