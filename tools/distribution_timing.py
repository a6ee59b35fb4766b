r"""Wall time of one run on one device against the same run under --distribution=mirrored.

    python tools/distribution_timing.py --flagfile=configs/quickstart_mas.cfg --epochs=4
    python tools/distribution_timing.py --flagfile=... --logical_cpus=2 --order=mirrored,none

Runs the experiment the flags describe twice in this process, in ``--order``, each in a
fresh directory under ``--out``, and prints each run's wall time, its training
iterations' time (results.json ``time_breakdown_s``), the replicas it ran on and the
ratios. With ``--logical_cpus=N`` the CPU is split into N logical devices first, so a
machine without GPUs has N replicas to mirror over (they share the same cores: this
measures the overhead of the strategy, not a speed-up). On a host with GPUs leave it at
0: MirroredStrategy takes every GPU. Speed figures live here, never in unit tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dgm_tf import runtime  # noqa: E402

runtime.prefer_onednn()  # as main does, before anything imports TensorFlow
from dgm_tf import main as cli  # noqa: E402  (defines the experiment flags)

flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into this many logical devices first (0: leave it).")
flags.DEFINE_list("order", ["none", "mirrored"], "Distributions to run, in this order.")
flags.DEFINE_string("out", "", "Directory for the runs (empty: a new temporary directory).")

FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.logical_cpus:  # before TensorFlow initialises its devices
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.logical_cpus)
    runtime.import_tensorflow(verbose=FLAGS.verbosity >= 1)
    from dgm_tf import engine

    config = cli.config_from_flags()
    out = pathlib.Path(FLAGS.out or tempfile.mkdtemp(prefix="distribution_timing_"))
    rows = {}
    for distribution in FLAGS.order:
        workdir = out / distribution
        start = time.perf_counter()
        results = engine.run_experiment(dataclasses.replace(config, distribution=distribution), workdir)
        wall = time.perf_counter() - start
        iterations = sum(t["iterations"] for t in results["time_breakdown_s"])
        rows[distribution] = {"wall_s": round(wall, 1), "iterations_s": round(iterations, 1),
                              "replicas": results["runtime"]["replicas"],
                              "A_T": round(results["average_accuracy"][-1], 4)}
        print(f"{distribution}: {rows[distribution]}", flush=True)
    if "none" in rows and "mirrored" in rows:
        for key in ("wall_s", "iterations_s"):
            print(f"mirrored / none, {key}: {rows['mirrored'][key] / rows['none'][key]:.2f}")
    (out / "distribution_timing.json").write_text(json.dumps(rows, indent=1))
    print(f"runs and distribution_timing.json in {out}")


if __name__ == "__main__":
    app.run(main)
