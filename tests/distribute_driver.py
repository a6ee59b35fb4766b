"""One run on one device and the same run under MirroredStrategy on 2 logical CPUs.

    python tests/distribute_driver.py <out dir> <method>

Writes <out dir>/none and <out dir>/mirrored (for tests/test_distribute.py). The CPU is
split before TensorFlow initialises its devices, so this must be its own process.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from dgm_tf import engine  # noqa: E402
from dgm_tf.config import Config  # noqa: E402

# Two one-class tasks of 32 training images, batches of 16: every global batch splits
# 8 + 8 (an empty replica would hit oneDNN's empty-batch Conv2D bug, WORKSPACE.md).
TINY = dict(dataset="embedded", class_order=(1, 7), epochs=2, train_examples_per_class=32, batch_size=16,
            ndf=4, eval_every=1, samples_per_class=2, export=False, mas_lambda=100.0, lr_d=0.01,
            log_every_steps=1)

if __name__ == "__main__":
    out, method = pathlib.Path(sys.argv[1]), sys.argv[2]
    for distribution in ("none", "mirrored"):
        config = Config(method=method, distribution=distribution, **TINY)
        engine.run_experiment(config, out / distribution)
