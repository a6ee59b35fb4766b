r"""Speed benchmark of one DGM training iteration, its phases and its floor.

    python tools/benchmark.py --flagfile=configs/mnist_dgmw.cfg
    python tools/benchmark.py --flagfile=configs/mnist_dgmw.cfg --tasks=0,9 --xla=false
    python tools/benchmark.py --flagfile=configs/mnist_dgmw.cfg --precisions=float32,mixed_bfloat16

For each task index in ``--tasks`` it builds the state that task needs — a generator
grown through that many earlier tasks, replay sets of the right size — without training
the earlier tasks (their masks reserve ``--reserve_fraction`` of the free weights at
random), then measures:

- ms per iteration (the method's ``train_step`` under ``tf.function``) and per phase
  (replay-classifier chunks, critic, generator);
- the floor: the bare forward/backward passes the iteration must do (same networks,
  batches and passes; no optimizer, no mask bookkeeping, no shuffling), and the ratio;
- the real path: ms per step of what a run does, the trainer's own loop
  (``dgm_tf.fit_loop.fit_epochs``, the mask-scale callback) over the method's
  ``tf.data`` pipeline for that epoch, timed from the first step's start to the last
  one's end of one whole epoch, and its ratio to the bare iteration;
- replay-set generation and evaluation time, trace time, images/s, peak memory.

Every figure is the median of ``--repeats`` repeats of ``--iterations`` calls after
``--warmup`` calls. The table is printed and written as JSON (``--output``). Speed
targets live here, never in unit tests.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dgm_tf import runtime  # noqa: E402

runtime.prefer_onednn()  # as main does, before anything imports TensorFlow
from dgm_tf import main as cli  # noqa: E402  (defines the experiment flags)

flags.DEFINE_list("tasks", ["0", "4", "9"], "Task indices to benchmark.")
# XLA is off by default: on CPU it made every phase 2.5-3x slower here (README), and
# with it the default run would take 13 minutes instead of under 5.
flags.DEFINE_list("xla", ["false"], "Compile the step with XLA: any of false,true (e.g. --xla=false,true).")
# bf16 pays only where the CPU computes it natively (AVX512_BF16 or AMX); elsewhere
# oneDNN emulates it and one discriminator pass took 7.6x longer than fp32 (README), so
# "auto" adds it only on such CPUs and the default run stays under 5 minutes.
flags.DEFINE_list("precisions", ["auto"], "Dtype policies to measure: any of float32,mixed_bfloat16,mixed_float16, "
                  "or auto (float32, plus mixed_bfloat16 when the CPU has native bf16).")
flags.DEFINE_integer("iterations", 10, "Calls per timed repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")
flags.DEFINE_integer("warmup", 3, "Untimed calls before timing.")
flags.DEFINE_float("reserve_fraction", 0.45, "Share of weights each earlier task reserves "
                   "(the quickstart measured 0.40-0.45).")
flags.DEFINE_string("output", "benchmark.json", "Where to write the JSON report.")

FLAGS = flags.FLAGS


def _interleaved_medians(fns: dict, args, warmup, iterations, repeats, self_timed=None) -> dict[str, float]:
    """Median ms per call of each function in ``fns``. Every repeat times each function
    in turn, so all of them see the same machine conditions. Timed one after the other
    on this shared virtual machine, the iteration/floor ratio at task 4 ranged from
    1.04 to 1.21 between runs of the same code; interleaved it was 1.12-1.14, and the
    iteration time matches a real run's steps, which also alternate with other graphs
    (validation, summaries) every epoch (README, Performance).

    ``self_timed``: functions of the repeat index that time themselves and return ms
    per step (the real path: one epoch each), called once per repeat in the same turn.
    """
    self_timed = self_timed or {}
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn(*args))
    times = {name: [] for name in [*fns, *self_timed]}
    for repeat in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iterations):
                out = fn(*args)
            _block(out)
            times[name].append((time.perf_counter() - start) / iterations * 1000.0)
        for name, fn in self_timed.items():
            times[name].append(fn(repeat))
    return {name: statistics.median(t) for name, t in times.items()}


def _block(out):
    import tensorflow as tf

    for t in tf.nest.flatten(out):
        if hasattr(t, "numpy"):
            t.numpy()


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, feature flags) of the first CPU; empty where /proc is absent."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return cpu, []
    cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), cpu)
    cpu_flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    return cpu, cpu_flags


def machine_info() -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    cpu, cpu_flags = _cpuinfo()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512": any(f.startswith("avx512f") for f in cpu_flags),
        "avx512_bf16": "avx512_bf16" in cpu_flags,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "onednn": runtime.onednn_enabled(),
    }


def native_bf16() -> bool:
    """Whether the CPU advertises bf16 arithmetic (AVX512_BF16 or AMX-BF16)."""
    cpu_flags = _cpuinfo()[1]
    return "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags


def resolve_precisions(requested: list[str]) -> list[str]:
    from dgm_tf.config import PRECISIONS

    out = []
    for p in (x.strip() for x in requested):
        if p == "auto":
            out += ["float32"] + (["mixed_bfloat16"] if native_bf16() else [])
        elif p in PRECISIONS:
            out.append(p)
        else:
            raise app.UsageError(f"--precisions: unknown {p!r}; choose from auto, {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(out))


def prepare_task_state(config, scenario, task_index: int, reserve_fraction: float, seed: int):
    """A DGM method (DGMw or DGMa, as ``config.method`` says) positioned at the start of
    ``task_index`` without training: each earlier task's mask claims a random
    ``reserve_fraction`` of its weights (DGMw) or channels (DGMa)."""
    import numpy as np

    from dgm_tf.config import DGM_METHODS
    from dgm_tf.methods import make_method

    if config.method not in DGM_METHODS:
        raise app.UsageError(f"--method: the benchmark times DGM's iteration; choose one of {', '.join(DGM_METHODS)}")
    rng = np.random.default_rng(seed)
    method = make_method(config, scenario)
    for task in scenario.tasks[:task_index]:
        method.begin_task(task)
        for conv in method.generator.masked_convs:
            e = conv.task_embeddings[task.index]
            e.assign(np.where(rng.random(e.shape) < reserve_fraction, 1.0, -1.0).astype(np.float32))
        method.end_task(task)
    start = time.perf_counter()
    method.begin_task(scenario.tasks[task_index])
    begin_s = time.perf_counter() - start
    return method, begin_s


def floor_function(trainer):
    """The bare passes of one iteration: no optimizer, masks or shuffles."""
    import tensorflow as tf

    g, d, t = trainer.generator, trainer.discriminator, trainer.task

    def used(grads):
        # Return every gradient (summed) so tf.function cannot prune unused passes.
        return tf.add_n([tf.reduce_sum(g) for g in grads if g is not None])

    def passes(batch):
        x, y = batch["x"], batch["y"]
        total = 0.0
        chunks = [x] + list(batch.get("replay_x", ()))
        for chunk in chunks:  # classifier: forward + backward per chunk
            with tf.GradientTape() as tape:
                _, logits = d(chunk, training=True)
                loss = tf.reduce_mean(logits)
            total += used(tape.gradient(loss, d.trainable_variables))
        z = g.noise(y, trainer.rng)
        fake = g(z, y, task=t, s=trainer.s, training=True)
        with tf.GradientTape() as tape:  # critic: real, fake, penalty
            a, _ = d(x, training=True)
            b, _ = d(fake, training=True)
            x_hat = 0.5 * (x + fake)
            with tf.GradientTape() as inner:
                inner.watch(x_hat)
                c, _ = d(x_hat, training=True)
            gp = tf.reduce_mean(tf.square(inner.gradient(c, x_hat)))
            loss = tf.reduce_mean(a) - tf.reduce_mean(b) + gp
        total += used(tape.gradient(loss, d.trainable_variables))
        with tf.GradientTape() as tape:  # generator: G forward, D forward, backward to G
            fake = g(z, y, task=t, s=trainer.s, training=True)
            out, _ = d(fake, training=True)
            loss = tf.reduce_mean(out)
        return total + used(tape.gradient(loss, trainer.g_variables))

    return passes


def real_path_epoch(method, task):
    """A function of the repeat index that trains one epoch of ``task`` as a run does
    (``method.train_task`` of a one-epoch config: the trainer's traced loop, the
    mask-scale callback, the epoch's ``tf.data`` pipeline) and returns ms per step from
    the first step's start to the last step's end. The first call also traces."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.end, self.steps = time.perf_counter(), batch + 1

    def one_epoch(repeat: int) -> float:
        del repeat  # every call trains epoch 0 of a one-epoch config: the same batches
        clock = StepClock()
        trainer = method.trainer
        s, s_epoch = trainer.s.numpy(), trainer.s_epoch.numpy()
        method.train_task(task, [clock])
        # The schedule leaves s near 1/smax; the other timed functions run at the
        # benchmark's fixed s (under loss scaling another s could change which steps skip).
        trainer.s.assign(s)
        trainer.s_epoch.assign(s_epoch)
        return (clock.end - clock.start) / clock.steps * 1000.0

    return one_epoch


def benchmark_task(config, scenario, task_index: int, xla: bool) -> dict:
    import dataclasses

    import tensorflow as tf

    from dgm_tf.engine import evaluate

    method, begin_s = prepare_task_state(config, scenario, task_index, FLAGS.reserve_fraction, config.seed)
    trainer = method.trainer
    batch = next(iter(method.train_dataset(scenario.tasks[task_index], 0)))
    trainer.s.assign(10.0)
    trainer.s_epoch.assign(100.0)
    timing = dict(warmup=FLAGS.warmup, iterations=FLAGS.iterations, repeats=FLAGS.repeats)

    step = tf.function(trainer.train_step, jit_compile=xla, autograph=False)  # as fit_loop traces it
    start = time.perf_counter()
    _block(step(batch))
    trace_s = time.perf_counter() - start
    replay_x = batch.get("replay_x", ())

    def classifier_phase(batch):  # the step's own chunk loop
        return trainer.replay_classifier_updates(
            batch["x"], batch["y"], batch.get("replay_x", ()), batch.get("replay_y", ())
        )

    phases = {
        "classifier": tf.function(classifier_phase, jit_compile=xla),
        "critic": tf.function(lambda batch: trainer.critic_update(batch["x"], batch["y"]), jit_compile=xla),
        "generator": tf.function(lambda batch: trainer.generator_update(batch["y"]), jit_compile=xla),
    }
    floor = tf.function(floor_function(trainer), jit_compile=xla)
    self_timed = {}
    if not xla:  # a run's loop never compiles with XLA (README, Performance)
        real_epoch = real_path_epoch(method, scenario.tasks[task_index])
        single = dataclasses.replace(config, epochs=1)
        method.config = single  # one epoch per call; the schedule is still the run's per-batch s ramp
        real_epoch(0)  # traces the loop's step, as a run's first step does
        self_timed["real_path"] = real_epoch
    ms = _interleaved_medians({"iteration": step, "floor": floor, **phases}, (batch,), **timing,
                              self_timed=self_timed)
    iteration_ms, floor_ms = ms.pop("iteration"), ms.pop("floor")
    real_ms = ms.pop("real_path", None)
    phase_ms = ms

    tasks = scenario.tasks[: task_index + 1]
    start = time.perf_counter()
    evaluate(method, tasks, "test")
    eval_s = time.perf_counter() - start
    batch_size = int(batch["x"].shape[0])
    return {
        "task": task_index,
        "precision": config.precision,
        "xla": xla,
        "generator_widths": list(method.generator.widths),
        "iteration_ms": iteration_ms,
        "phase_ms": phase_ms,
        "floor_ms": floor_ms,
        "ratio_to_floor": iteration_ms / floor_ms,
        "real_path_ms": real_ms,
        "real_path_ratio": None if real_ms is None else real_ms / iteration_ms,
        "real_path_steps_per_epoch": int(method.train_dataset(scenario.tasks[task_index], 0).cardinality()),
        "trace_s": trace_s,
        "begin_task_s": begin_s,
        "replay_images": int(sum(len(y) for _, y in method.replay)),
        "evaluation_s": eval_s,
        "real_images_per_s": batch_size / iteration_ms * 1000.0,
        "classifier_images_per_s": batch_size * (len(replay_x) + 1) / iteration_ms * 1000.0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "test_images": int(sum(len(t.y_test) for t in tasks)),
    }


def _opt(value, fmt: str) -> str:
    width = int(fmt.split(".")[0])
    return f"{'-':>{width}}" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'task':>4} {'precision':>14} {'xla':>5} {'iter ms':>8} {'clf ms':>7} {'critic':>7} {'gen ms':>7} "
        f"{'floor':>7} {'ratio':>6} {'real ms':>7} {'real/it':>7} {'trace s':>7} {'replay s':>8} {'eval s':>6} "
        f"{'img/s':>6} {'RSS MiB':>8}"
    )
    lines = [head]
    for r in rows:
        p = r["phase_ms"]
        lines.append(
            f"{r['task']:>4} {r['precision']:>14} {str(r['xla']):>5} {r['iteration_ms']:>8.1f} {p['classifier']:>7.1f} "
            f"{p['critic']:>7.1f} {p['generator']:>7.1f} {r['floor_ms']:>7.1f} {r['ratio_to_floor']:>6.2f} "
            f"{_opt(r['real_path_ms'], '7.1f')} {_opt(r['real_path_ratio'], '7.2f')} "
            f"{r['trace_s']:>7.2f} {r['begin_task_s']:>8.2f} {r['evaluation_s']:>6.2f} "
            f"{r['real_images_per_s']:>6.0f} {r['peak_rss_mib']:>8.0f}"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    import dataclasses

    runtime.import_tensorflow(verbose=FLAGS.verbosity >= 1)  # TensorFlow's start-up noise hidden, as in main
    import keras

    from dgm_tf.engine import build_scenario

    config = cli.config_from_flags()
    scenario = build_scenario(config)
    tasks = [int(t) for t in FLAGS.tasks]
    bad = [t for t in tasks if not 0 <= t < scenario.num_tasks]
    if bad:
        raise app.UsageError(f"--tasks: {bad} outside 0..{scenario.num_tasks - 1}")
    precisions = resolve_precisions(FLAGS.precisions)
    info = machine_info()
    print("machine:", json.dumps(info))
    print(
        f"config: method={config.method} dataset={config.dataset} batch={config.batch_size} "
        f"ngf={config.ngf} ndf={config.ndf} nz={config.nz} train images/task={len(scenario.tasks[0].x_train)}"
    )
    rows = []
    for precision in precisions:
        run_config = dataclasses.replace(config, precision=precision)
        for xla in [x.strip().lower() in ("1", "true", "yes") for x in FLAGS.xla]:
            for t in tasks:
                keras.utils.set_random_seed(config.seed)
                rows.append(benchmark_task(run_config, scenario, t, xla))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    report = {"machine": info, "config": config.as_dict(), "results": rows}
    with open(FLAGS.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    flags.FLAGS.set_default("workdir", "unused")
    app.run(main)
