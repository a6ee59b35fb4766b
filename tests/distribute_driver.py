"""One run on one device and the same run under MirroredStrategy on 2 logical CPUs.

    python tests/distribute_driver.py <out dir> <method> [switch]

Writes <out dir>/none and <out dir>/mirrored (for tests/test_distribute.py); with
``switch`` instead <out dir>/none and <out dir>/switched: a one-device run stopped after
its first task and resumed under MirroredStrategy. The CPU is split before TensorFlow
initialises its devices, so this must be its own process.
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

# DGM at smax 10: at the paper's 1e4, s*e amplifies last-bit rounding so much that even
# one device with oneDNN on and off drifts apart by 1e-1 within a task (WORKSPACE.md).
DGM = dict(nz=16, ngf=4, smax=10.0)
# NISPA: a 32-unit MLP, phases of 2 epochs, at most 4 phases per task (nispa_k=4).
NISPA = dict(nispa_hidden=32, nispa_phase_epochs=2, nispa_k=4.0)
# Dynamos: nf 4; the first epoch is the ungated warm-up, then every step rehearses
# (buffer of 16, batches of 8: 4 per replica) and feeds the prototype losses.
DYNAMOS = dict(replay_buffer=16, dynamos_buffer_batch=8, dynamos_nf=4, dynamos_warmup=1, keep_checkpoints=20)


class _Stop(Exception):
    """Ends a run after its first task (its task-end checkpoint is written)."""


def stopped_after_first_task(config, workdir):
    from dgm_tf.engine import loop

    original = loop._run_task

    def run_task(config, scenario, path, method, monitor, task, *args):
        if task.index == 1:
            raise _Stop
        return original(config, scenario, path, method, monitor, task, *args)

    loop._run_task = run_task
    try:
        engine.run_experiment(config, workdir)
    except _Stop:
        pass
    finally:
        loop._run_task = original


if __name__ == "__main__":
    out, method = pathlib.Path(sys.argv[1]), sys.argv[2]
    switch = sys.argv[3:] == ["switch"]
    flags = dict(TINY, **{"dgmw": DGM, "dgma": DGM, "nispa": NISPA, "dynamos": DYNAMOS}.get(method, {}))
    for distribution in ("none", "mirrored"):
        config = Config(method=method, distribution=distribution, **flags)
        if not switch:
            engine.run_experiment(config, out / distribution)
        elif distribution == "none":
            engine.run_experiment(config, out / "none")
            stopped_after_first_task(config, out / "switched")
        else:  # task 2 on two replicas, from the one-device checkpoint of task 1
            engine.run_experiment(config, out / "switched", resume=True)
