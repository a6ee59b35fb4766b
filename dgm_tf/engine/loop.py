"""The task loop shared by every method: begin task, fit, put back the best validation
epoch's classifier (``--restore_best``), evaluate, end task, write.

``run_experiment`` checks and locks the workdir, builds the scenario
(``build_scenario``), restores a resumed run and runs each task (``_run_task``), which
wires the callbacks and timers, evaluates, exports (``check_finite_for_export`` first)
and writes results.json and the checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time

import keras
import numpy as np
from absl import logging

from dgm_tf import export, io_utils, monitoring
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config, ConfigError
from dgm_tf.data import Scenario, load_dataset, make_scenario, resolve_class_order, scenario_fingerprint
from dgm_tf.engine.distribute import (
    cluster_errors, is_chief, make_strategy, worker_name,
)
from dgm_tf.engine.callbacks import (
    EpochCheckpoint, NonFiniteGuard, ProgressLogger, TrainingError, ValidationSelection, epoch_budget, epochs_run,
)
from dgm_tf.engine.evaluation import (
    REPLAY_EVAL_PER_CLASS, _results, evaluate, format_summary, replay_accuracy, write_sample_grid,
)
from dgm_tf.engine.resume import _rows_before_restore_best, check_resume, resume_checkpoint
from dgm_tf.engine.timing import StepTimer, Stopwatch, TimedCallback
from dgm_tf.engine.writer import BackgroundWriter, WriterCallback
from dgm_tf.methods import make_method
from dgm_tf.methods.base import ContinualMethod
from dgm_tf.workdir import WorkdirError, check_fresh, lock_workdir


def build_scenario(config: Config) -> Scenario:
    """Load the dataset and cut it into tasks as the config says."""
    used = config.num_tasks * config.classes_per_task if config.num_tasks else None
    resolved = []

    def select(class_ids):
        # Sources that read selectively (tfds) resolve the order over all the dataset's
        # class ids and read only the classes the tasks use.
        order = resolve_class_order(config.class_order, class_ids)
        order = list(class_ids) if order is None else [int(c) for c in order]
        order = order[:used] if used else order
        resolved.append(order)
        return order

    raw = load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        download=config.download,
        channels=config.channels,
        test_fraction=config.test_fraction,
        seed=config.seed,
        select=select,
    )
    scenario = make_scenario(
        raw,
        class_order=resolved[-1] if resolved else config.class_order,
        classes_per_task=config.classes_per_task,
        num_tasks=config.num_tasks or None,
        train_examples_per_class=config.train_examples_per_class,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
    )
    if 0 < config.replay_buffer < scenario.num_classes:
        raise ConfigError(
            f"--replay_buffer: {config.replay_buffer} images cannot hold one of each of the scenario's "
            f"{scenario.num_classes} classes"
        )
    if config.nz <= scenario.num_classes:
        raise ConfigError(
            f"--nz: must exceed the number of classes ({scenario.num_classes}), whose one-hot "
            f"code overwrites the first entries of the noise; got {config.nz}"
        )
    return scenario


def run_experiment(config: Config, workdir: str | os.PathLike, resume: bool = False) -> dict:
    """Run every task of the scenario and return (and write) the results.

    With ``resume``, continue the run in ``workdir`` from its newest checkpoint (the
    flags and the data must be those of the run); the results and final weights equal
    an uninterrupted run's. The workdir is locked for the whole run
    (``dgm_tf.workdir``): a second process is refused at once. Under
    ``--distribution=multi_worker`` only the chief writes ``workdir``; the other
    workers train alike into temporary directories of their own (``run_worker``).

    Raises ConfigError, DataError or WorkdirError for user errors, before anything is
    written when possible (CheckpointError when no checkpoint can be resumed from);
    TrainingError when training cannot go on.
    """
    path = pathlib.Path(workdir)
    # multi_worker: before TensorFlow runs any op of this process, and before the
    # workdir checks, so that a chief that refuses its workdir stops the whole cluster
    # (the others wait for it at start-up, and learn at their first step that it left).
    strategy = make_strategy(config)  # refuses a TF_CONFIG that cannot start
    with _cluster_errors_reported(config):
        if not is_chief(strategy):
            return run_worker(config, strategy, path, resume)
        return _run_in_workdir(config, strategy, path, resume)


def _run_in_workdir(config: Config, strategy, path: pathlib.Path, resume: bool) -> dict:
    """The run in ``path``: lock it, read the data, write the flags, train."""
    with contextlib.ExitStack() as stack:
        if resume:
            check_resume(path, config)  # a mismatch is reported before any data is read
            stack.enter_context(lock_workdir(path))  # a second process is refused at once
        else:
            check_fresh(path)  # a non-empty directory is refused before any data is read
        scenario = build_scenario(config)  # user errors in data/flags surface before any write
        if not resume:
            stack.enter_context(lock_workdir(path, fresh=True))  # creates it; rechecks emptiness
            io_utils.atomic_write_text(
                path / "flags.txt",
                "# Reproduces this run: python -m dgm_tf.main --flagfile=flags.txt --workdir=<new dir>\n"
                + "\n".join(config.to_flags())
                + "\n",
            )
        # Every network, optimizer and trainer is created in the strategy's scope.
        if strategy is not None:
            stack.enter_context(strategy.scope())
        results = _run_experiment(config, scenario, path, resume, chief=is_chief(strategy))
        if config.distribution == "multi_worker":
            # Every worker logs it: equal lines show the workers stayed in step.
            logging.info("final weights sha256 %s (%s)", weights_digest(path), worker_name(strategy))
        return results


def run_worker(config: Config, strategy, path: pathlib.Path, resume: bool) -> dict:
    """A non-chief worker of a ``multi_worker`` cluster: the same run, into a temporary
    directory of its own that is removed when it stops (``path`` is the chief's, only
    read: to resume, this worker starts from a copy of the chief's run)."""
    if resume and not path.is_dir():
        raise WorkdirError(
            f"--workdir={path}: not found on this worker; to --resume, every worker of a multi_worker cluster "
            "reads the chief's run directory, which must be on a file system they share"
        )
    own = pathlib.Path(tempfile.mkdtemp(prefix="dgm_tf_worker_"))
    try:
        if resume:
            check_resume(path, config)
            for name in ("flags.txt", "results.json"):
                if (path / name).is_file():
                    shutil.copy2(path / name, own / name)
            if (path / "ckpt").is_dir():
                shutil.copytree(path / "ckpt", own / "ckpt")
        logging.info("%s of the cluster: the chief writes %s; this worker's files go to %s (removed at the end)",
                     worker_name(strategy), path, own)
        if not resume:
            own.rmdir()  # a fresh run creates its directory itself
        return _run_in_workdir(config, strategy, own, resume)
    finally:
        shutil.rmtree(own, ignore_errors=True)


def weights_digest(path: pathlib.Path) -> str:
    """sha256 of the arrays of the run's newest checkpoint (names and bytes, in name
    order): equal on every worker of a cluster that stayed in step."""
    latest = CheckpointManager(path / "ckpt").newest()
    digest = hashlib.sha256()
    for name in sorted(latest.arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(latest.arrays[name]).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _cluster_errors_reported(config: Config):
    """A collective that fails because another worker stopped (or cannot be reached)
    ends this one with one line; what it wrote is kept."""
    if config.distribution != "multi_worker":
        yield
        return
    try:
        yield
    except cluster_errors() as e:
        # TensorFlow's message starts "Graph execution error:"; the cause is further down.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = next((line for line in lines if "unhealthy" in line or "abort" in line.lower()),
                     lines[0] if lines else "")
        raise TrainingError(
            f"another worker of the cluster stopped or cannot be reached ({type(e).__name__}: {cause[:160]}); "
            "the chief's checkpoints are kept: start every worker again with --resume"
        ) from None


def _run_experiment(config: Config, scenario: Scenario, path: pathlib.Path, resume: bool, chief: bool = True) -> dict:
    """``run_experiment`` once the workdir is locked and the scenario built (``chief``:
    this process writes the run's exports; a multi_worker cluster's other workers do not
    need them)."""
    if config.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # process-wide, as the user asked
    checkpoints = CheckpointManager(path / "ckpt", keep=config.keep_checkpoints)
    keras.utils.set_random_seed(config.seed)
    method = make_method(config, scenario)
    # Restored before anything is written (the Monitor creates its event file at
    # once), so a refused resume leaves the workdir as it was.
    latest = resume_checkpoint(checkpoints, method, scenario, config, path) if resume else None
    fingerprint = scenario_fingerprint(scenario)
    monitor = monitoring.Monitor(path / "tb", config, scenario)
    rows = {
        "acc": [], "aware": [], "best": [], "replay": [], "summaries": [], "wall": [], "time": [],
        "last_acc": [], "last_aware": [], "best_epoch": [], "selected_epoch": [],
    }
    first_task, resume_mid_task = 0, False
    if latest is None:
        if resume:
            logging.warning("no checkpoint in %s: starting the run from its first task", path / "ckpt")
        monitor.start()
    else:
        st = latest.state
        rows = st["engine"]
        rows.setdefault("time", [None] * len(rows["wall"]))  # checkpoints from before the breakdown
        if "selected_epoch" not in rows:
            _rows_before_restore_best(rows, config, path)
        monitor.restore(st["monitor"])
        if st["phase"] == "task_end":
            first_task = st["task"] + 1
            if config.export and chief:
                _export_missing(method, scenario, st["task"], path / "export")
        else:
            first_task, resume_mid_task = st["task"], True
        logging.info("resuming from %s: task %d, %s", latest.path, st["task"] + 1,
                     "finished" if st["phase"] == "task_end" else f"{st['epochs_done']} epochs done")
    logging.info(
        "%s on %s: %d tasks of %d classes, order %s, %d train images per task",
        config.method, scenario.dataset, scenario.num_tasks, scenario.classes_per_task,
        list(scenario.class_order), len(scenario.tasks[0].x_train),
    )

    # Checkpoints are written on a thread of their own (dgm_tf/engine/writer.py): save
    # takes the snapshot here, in the training thread, and training goes on while it is
    # written; one write at a time, in order.
    checkpoint_writer = BackgroundWriter()

    def save(phase, task_index, epochs_done, selection, elapsed, stopwatch=None):
        method_state, arrays, shared = method.checkpoint_state(during_task=phase == "epoch")
        if selection is not None:
            arrays.update(selection.arrays())
        # Refused here, in the training thread, before anything is written or pruned
        # (io_utils.NonFiniteError; the loop names the task), as a synchronous save did.
        checkpoints.check_finite(arrays, shared)
        # Encoded here too, as the write will (io_utils.atomic_write_json: NaN and numpy
        # scalars are refused), and decoded again: a copy that the rows, the monitor's
        # state and the clock, which go on changing, cannot reach.
        document = json.loads(json.dumps({
            "phase": phase, "task": task_index, "epochs_done": epochs_done,
            "engine": rows, "method": method_state, "monitor": monitor.state(),
            "selection": None if selection is None else selection.state(),
            "task_elapsed_s": elapsed, "task_time_s": None if stopwatch is None else stopwatch.totals,
            "config": config.as_dict(), "data": fingerprint,
        }, allow_nan=False))
        # The arrays are copies (Tensor.numpy) or arrays their owners replace rather than
        # change in place (ContinualMethod.checkpoint_state); already checked.
        checkpoint_writer.submit(f"checkpoint of task {task_index + 1} ({phase})",
                                 lambda: checkpoints.save(document, arrays, shared, check_finite=False))

    results = _results(config, scenario, rows) if rows["acc"] else {}
    writer = BackgroundWriter()
    try:
        for task in scenario.tasks[first_task:]:
            resume_from = latest if resume_mid_task and task.index == first_task else None
            try:
                results = _run_task(config, scenario, path, method, monitor, task, rows, save, resume_from, writer)
            except io_utils.NonFiniteError as e:  # weights or generated images: as a non-finite loss
                raise TrainingError(
                    f"{e} in task {task.index + 1}; nothing was saved from it, the checkpoints of earlier "
                    "epochs are kept (lower the learning rates in a new run)"
                ) from None
        writer.wait()
        checkpoint_writer.wait()
    except BaseException:
        # A pending export or checkpoint is finished (or fails) before the process goes
        # on: never a half-written version left behind by a clean stop, and the newest
        # checkpoint taken is on disk.
        writer.drain()
        checkpoint_writer.drain()
        # Flush what was written, also when training stops on an error; a failure to
        # close (the disk that just filled up) must not hide the error that stopped it.
        try:
            monitor.close()
        except Exception as close_error:  # noqa: BLE001 (reported, the original error goes on)
            logging.warning("TensorBoard events could not be flushed: %s", close_error)
        raise
    monitor.close()
    logging.info("summary:\n%s", format_summary(results))
    return results


def _run_task(config, scenario, path, method, monitor, task, rows, save, resume_from, writer=None) -> dict:
    """One task: begin it (or restore it mid-task from the checkpoint ``resume_from``),
    train, evaluate the last epoch's classifier, put back the best validation epoch's
    (``--restore_best``) and evaluate it, end the task, write its outputs and
    checkpoint; returns the results. ``writer``: where the previous task's export may
    still be being written (``dgm_tf.engine.writer``)."""
    T = scenario.num_tasks
    writer = writer or BackgroundWriter()
    t = task.index
    start = time.perf_counter()
    if resume_from is not None:  # the method and the selection were restored by resume_checkpoint
        st = resume_from.state
        clock = Stopwatch(st.get("task_time_s"))
        selection = resume_from.restored
        initial_epoch, before = st["epochs_done"], st["task_elapsed_s"]
        budget, own_loop = epoch_budget(method, task, config.epochs)
    else:
        clock = Stopwatch()
        with clock.phase("begin_task"):
            method.begin_task(task)
        # --epochs, or at most the method's own count (callbacks.epoch_budget).
        budget, own_loop = epoch_budget(method, task, config.epochs)
        selection = ValidationSelection(method, scenario.tasks[: t + 1], config.eval_every, budget)
        initial_epoch, before = 0, 0.0

    def elapsed():
        return before + time.perf_counter() - start

    callbacks = [
        StepTimer(clock),
        TimedCallback(selection, clock, "validation"),
        ProgressLogger(t, T, budget, initial_epoch, at_most=own_loop),
        TimedCallback(monitor.callback(method, task), clock, "monitoring"),
        NonFiniteGuard(t),
        # Starts the previous task's export after the first step; waits for it before the
        # epoch checkpoint, which never precedes it (dgm_tf/engine/writer.py).
        TimedCallback(WriterCallback(writer), clock, "export"),
        TimedCallback(EpochCheckpoint(lambda done: save("epoch", t, done, selection, elapsed(), clock)),
                      clock, "checkpoint"),
    ]
    method.train_task(task, callbacks, initial_epoch=initial_epoch)
    seen = scenario.tasks[: t + 1]
    # Epochs run, and the epoch whose classifier train_task left in place: the last,
    # unless the method selects its own (NISPA's revert; callbacks.epochs_run).
    ran, kept = epochs_run(method, config.epochs)
    in_place = ran - 1 if kept is None else kept
    with clock.phase("evaluation"):
        # The classifier trained to the task's last epoch: the reference's figure
        # (a method that selects its own: the classifier it ended the task with).
        last_il, last_aware = evaluate(method, seen, "test")
    selected = in_place
    if config.restore_best and kept is None:
        # Before evaluation, end_task (MAS takes theta* and importance here), samples,
        # export and the task-end checkpoint: all of them see the restored classifier,
        # and methods whose classifier carries over start the next task from it.
        with clock.phase("validation"):
            selected = selection.restore_best()
    with clock.phase("evaluation"):
        if selected == in_place:  # the weights train_task ended with (restored or not)
            class_il, task_aware = last_il, last_aware
        else:
            class_il, task_aware = evaluate(method, seen, "test")
        # Restored: the best epoch's row is the one just measured; else evaluated aside.
        best_test = list(class_il) if selected == selection.best_epoch else selection.finish(last_il, in_place)
    with clock.phase("end_task"):
        method.end_task(task)
    with clock.phase("samples"):
        grid = write_sample_grid(method, scenario, t, path, config)
    if config.export:
        with clock.phase("export"):
            check_finite_for_export(method, t)
            write = export.prepare_task_export(method, scenario, t + 1, path / "export")

            def write_and_log():
                exported = write()
                logging.info("exported %s", ", ".join(f"{k} -> {v}" for k, v in sorted(exported.items())))

            if _export_in_background(config, method, t, T):
                writer.submit(f"export of version {t + 1}", write_and_log, deferred=True)
            else:
                writer.wait()
                write_and_log()
    with clock.phase("evaluation"):
        rows["replay"].append(
            replay_accuracy(method, scenario, t, REPLAY_EVAL_PER_CLASS, seed=config.seed + 104729 * (t + 1))
        )
    # The task's wall time ends here: its results.json, TensorBoard summaries and
    # end-of-task checkpoint are written after it is recorded.
    rows["wall"].append(round(elapsed(), 3))
    rows["time"].append(clock.breakdown(rows["wall"][-1]))
    rows["acc"].append(class_il)
    rows["aware"].append(task_aware)
    rows["best"].append(best_test)
    rows["last_acc"].append(last_il)
    rows["last_aware"].append(last_aware)
    rows["best_epoch"].append(None if selection.best_epoch is None else selection.best_epoch + 1)
    rows["selected_epoch"].append(selected + 1)
    rows["summaries"].append(method.task_summary())
    results = _results(config, scenario, rows)
    io_utils.atomic_write_json(path / "results.json", results)
    monitor.task_end(method, t, results, grid, rows["replay"][-1])
    save("task_end", t, ran, None, rows["wall"][-1])
    logging.info(
        "task %d/%d done in %.0fs: A_%d=%.4f (classifier of epoch %d; last epoch's A_%d=%.4f)  accuracies %s",
        t + 1, T, rows["wall"][-1], t + 1, results["average_accuracy"][-1], selected + 1, t + 1,
        results["last_epoch_average_accuracy"][-1], " ".join(f"{a:.3f}" for a in class_il),
    )
    logging.info(
        "task %d/%d time: %s", t + 1, T,
        ", ".join(f"{name} {seconds:.1f}s" for name, seconds in rows["time"][-1].items() if seconds),
    )
    return results


def _export_in_background(config: Config, method: ContinualMethod, task: int, num_tasks: int) -> bool:
    """Write this task's export while the next task trains (dgm_tf/engine/writer.py):
    only when the next task trains new network objects, and not the last task's (there
    is nothing left to overlap, and the run's final checkpoint follows its export).
    On one device only: under a tf.distribute strategy the export stays in line (its
    variables are the strategy's; WORKSPACE, "Performance")."""
    return method.fresh_networks_each_task and task + 1 < num_tasks and config.distribution == "none"


def _export_missing(method: ContinualMethod, scenario: Scenario, task: int, export_root: pathlib.Path) -> None:
    """Write task ``task``'s export again if the run stopped after its task-end
    checkpoint but before the export (written in the background) was complete; the
    method was just restored from that checkpoint, so it holds the exported networks."""
    version = task + 1
    missing = [m for m in export.exported_models(method) if not (export_root / m / str(version)).is_dir()]
    if missing:
        logging.warning("export version %d of %s is missing (the run stopped while it was written): writing it again",
                        version, " and ".join(missing))
        check_finite_for_export(method, task)
        export.export_task(method, scenario, version, export_root)


def check_finite_for_export(method: ContinualMethod, task: int) -> None:
    """Raise io_utils.NonFiniteError naming the first non-finite weight of the networks
    about to be exported (a SavedModel of NaN weights would serve NaN)."""
    network, _ = method.classifier_for_export()
    io_utils.check_finite(network.weights, what=f"classifier weights after task {task + 1}")
    memory = method.generator_for_export()
    if memory is not None:
        io_utils.check_finite(memory[0].weights, what=f"generator weights after task {task + 1}")
