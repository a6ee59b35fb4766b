"""One Dynamos training step on one device and on 2 replicas of a split CPU, from the
same weights, batch and buffer (for tests/test_distribute.py).

    python tests/dynamos_step_driver.py <out.npz>

Writes the largest weight and buffer differences between the two. The CPU is split
before TensorFlow initialises its devices, so this must be its own process.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from dgm_tf.config import Config  # noqa: E402
from dgm_tf.fit_loop import fit_epochs  # noqa: E402
from dgm_tf.methods import dynamos_core as core  # noqa: E402
from dgm_tf.methods.dynamos import DynamosTrainer  # noqa: E402
from dgm_tf.models.dynamos_net import DynamosResNet  # noqa: E402

CONFIG = Config(method="dynamos", dataset="embedded", replay_buffer=16, dynamos_buffer_batch=8, dynamos_nf=4)
data = np.random.default_rng(0)
X = data.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
Y = data.integers(0, 2, 16)
STORED = data.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)


def one_step(strategy):
    """A gated, rehearsing step (full buffer of correctly classified rows: every term
    of the loss is active) from weights seeded alike."""
    with strategy.scope():
        keras.utils.set_random_seed(0)
        network = DynamosResNet(2, 1, 32, nf=4)
        memory = core.ReservoirMemory(16, (32, 32, 1), 2, network.gate_width)
        trainer = DynamosTrainer(network, memory, CONFIG, task=1)
        trainer.compile(keras.optimizers.SGD(CONFIG.dynamos_lr))
    memory.examples.assign(STORED)
    memory.labels.assign(Y.astype(np.int64))
    memory.logits.assign(np.eye(2, dtype=np.float32)[Y] * 3.0)
    memory.widths.assign(np.full(16, 2))
    memory.filled.assign(np.ones(16, bool))
    memory.policy_logits.assign(np.random.default_rng(1).normal(size=(16, network.gate_width)).astype(np.float32))
    batch = {"x": X, "y": Y.astype(np.int64), "warm": np.zeros(16, bool), "key": np.full(16, 5, np.int64)}
    with strategy.scope():
        fit_epochs(trainer, lambda epoch: tf.data.Dataset.from_tensor_slices(batch).batch(16), 0, 1, [])
    return [v.numpy() for v in network.weights], memory.state()


if __name__ == "__main__":
    w1, m1 = one_step(tf.distribute.get_strategy())
    w2, m2 = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    np.savez(sys.argv[1], net=max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2)),
             buffer=max(float(np.max(np.abs(m1[k].astype(float) - m2[k].astype(float)))) for k in m1),
             written=int(m1["seen"]))
