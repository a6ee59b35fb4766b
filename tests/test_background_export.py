"""Task t's export written while task t+1 trains (dgm_tf/engine/writer.py): it really
overlaps the next task, it is complete before any checkpoint of that task, it holds task
t's networks (not the ones training next), the methods that allow it never touch the
exported networks again, and a version lost to a crash is written again on resume."""

import json
import threading

import numpy as np
import pytest
import tensorflow as tf

from dgm_tf import engine, export
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config
from dgm_tf.engine import loop
from dgm_tf.engine.writer import BackgroundWriter
from dgm_tf.methods import make_method
from tests.dgm_helpers import assert_served_accuracy_matches, train_task_with_hook
from tests.test_baselines import tiny_config
from tests.test_dynamos import TINY as DYNAMOS_TINY


def test_writer_runs_one_write_at_a_time_and_hands_errors_to_the_waiter():
    writer, order = BackgroundWriter(), []
    release = threading.Event()

    def first():
        release.wait(30)
        order.append("first")

    writer.submit("first", first)
    assert writer.pending
    release.set()
    writer.submit("second", lambda: order.append("second"))  # waits for the first
    assert order[0] == "first"
    writer.wait()
    assert order == ["first", "second"] and not writer.pending

    def fails():
        raise OSError(28, "No space left on device")

    writer.submit("failing", fails)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert writer.wait() == 0.0  # the error is raised once
    writer.submit("failing again", fails)
    writer.drain()  # a caller already stopping: logged, not raised
    assert not writer.pending
    # Deferred: nothing runs before release (the next task's first step) or a wait.
    started = threading.Event()
    writer.submit("deferred", started.set, deferred=True)
    assert not started.wait(0.5)
    writer.release()
    assert started.wait(30)
    writer.wait()
    writer.submit("deferred, then waited for", lambda: order.append("waited"), deferred=True)
    writer.wait()  # releases it: never waits for a write that cannot start
    assert order[-1] == "waited"


@pytest.mark.parametrize("name", ["dgmw", "finetune", "mas", "joint", "dynamos", "nispa"])
def test_methods_that_allow_it_never_change_the_exported_networks(tiny_scenario, name):
    """``fresh_networks_each_task``: after task 0's export is taken, task 1 begins and
    trains; the exported objects are not the ones it trains and keep their weights."""
    if name == "dynamos":
        config = Config(**dict(DYNAMOS_TINY, class_order=(1, 7, 8), classes_per_task=1, epochs=1))
    else:
        config = tiny_config(name, class_order=(1, 7, 8), classes_per_task=1, epochs=1)
    method = make_method(config, tiny_scenario)
    if name == "nispa":  # the network is the same object from task to task: exported in line
        assert not method.fresh_networks_each_task
        return
    assert method.fresh_networks_each_task
    t0, t1 = tiny_scenario.tasks[:2]
    method.begin_task(t0)  # untrained: the property is about objects, not values
    method.end_task(t0)
    exported = [method.classifier_for_export()[0]]
    if method.generator_for_export() is not None:
        exported.append(method.generator_for_export()[0])
    before = [[np.array(v.numpy(), copy=True) for v in net.weights] for net in exported]
    method.begin_task(t1)
    method.train_task(t1, [])
    now = [method.classifier_for_export()[0]] + (
        [method.generator_for_export()[0]] if method.generator_for_export() is not None else [])
    trained = {id(v) for net in now for v in net.weights}
    for net, weights in zip(exported, before):
        assert all(net is not other for other in now)
        assert not trained & {id(v) for v in net.weights}
        for v, w in zip(net.weights, weights):
            np.testing.assert_array_equal(v.numpy(), w, err_msg=v.path)


def test_export_overlaps_the_next_task_and_precedes_its_checkpoints(tmp_path, monkeypatch):
    """Fine-tuning, 3 tasks: version 1's SavedModel is written only once task 2 has begun
    (the write blocks until then, so a run that exported in line would time out) and
    after task 2's first step (the writer starts then), it is
    complete before task 2's first checkpoint, and the last version is written in line,
    before the run's final checkpoint. Each version classifies as its task's row of the
    accuracy matrix says (fine-tuning forgets, so the rows differ)."""
    events, begun, checkpointed = [], threading.Event(), threading.Event()
    original_save = export._save

    def save(module, directory, *a, **k):
        version = int(directory.name.split("-")[1])
        events.append((f"start export {version}", threading.current_thread().name))
        if version == 1:
            assert begun.wait(60), "version 1 was written before task 2 began: not in the background"
            # Gives a checkpoint of task 2 that does not wait for this export time to
            # come first (the order assertion below then fails); one that waits never does.
            checkpointed.wait(3)
        original_save(module, directory, *a, **k)
        events.append((f"export {version}", threading.current_thread().name))

    monkeypatch.setattr(export, "_save", save)
    from dgm_tf.methods.classifier_base import ClassifierBaseline

    begin = ClassifierBaseline.begin_task

    def begin_task(self, task):
        begin(self, task)
        events.append((f"begin {task.index + 1}", threading.current_thread().name))
        if task.index == 1:
            begun.set()

    monkeypatch.setattr(ClassifierBaseline, "begin_task", begin_task)
    # Before task 2's second batch: its first step is done.
    monkeypatch.setattr(ClassifierBaseline, "train_task", train_task_with_hook(
        ClassifierBaseline.train_task, (1, 0, 1), lambda: events.append(("step 2", threading.current_thread().name))))
    checkpoint_save = CheckpointManager.save

    def save_checkpoint(self, state, *a, **k):
        events.append((f"checkpoint {state['phase']} {state['task'] + 1}", threading.current_thread().name))
        if state["task"] == 1:
            checkpointed.set()
        return checkpoint_save(self, state, *a, **k)

    monkeypatch.setattr(CheckpointManager, "save", save_checkpoint)
    config = tiny_config("finetune", class_order=(1, 7, 8), classes_per_task=1, epochs=2)
    workdir = tmp_path / "wd"
    results = engine.run_experiment(config, workdir)
    names = [e for e, _ in events]
    main = threading.current_thread().name
    assert dict(events)["export 1"].startswith("dgm_tf-writer")
    assert dict(events)["export 2"].startswith("dgm_tf-writer") and dict(events)["export 3"] == main
    assert names.index("begin 2") < names.index("step 2") < names.index("start export 1")
    assert names.index("export 1") < names.index("checkpoint epoch 2")
    assert names.index("begin 3") < names.index("export 2") < names.index("checkpoint epoch 3")
    assert names.index("export 3") < names.index("checkpoint task_end 3") == len(names) - 1
    # Every version holds its own task's classifier.
    scenario = engine.build_scenario(config)
    for version in (1, 2, 3):
        assert sorted(p.name for p in (workdir / "export" / "classifier").iterdir()) == ["1", "2", "3"]
        serve = tf.saved_model.load(str(workdir / "export" / "classifier" / str(version))).signatures["serving_float"]
        for j, task in enumerate(scenario.tasks[:version]):
            expected = np.array([scenario.class_order[y] for y in task.y_test])
            assert_served_accuracy_matches(serve(images=tf.constant(task.x_test)), expected,
                                           results["accuracy_matrix"][version - 1][j])
    # Task 2 classifies task 1's class worse than version 1 did: a version exported from
    # the network that trained on would carry the later row.
    assert results["accuracy_matrix"][1][0] < results["accuracy_matrix"][0][0]
    breakdown = json.loads((workdir / "results.json").read_text())["time_breakdown_s"]
    assert all(row["export"] >= 0 for row in breakdown)


def test_only_methods_with_fresh_networks_on_one_device_export_in_the_background(tiny_scenario):
    fresh = make_method(tiny_config("finetune"), tiny_scenario)
    assert loop._export_in_background(fresh.config, fresh, 0, 3)
    assert not loop._export_in_background(fresh.config, fresh, 2, 3)  # the last task: in line
    mirrored = tiny_config("finetune", distribution="mirrored")
    assert not loop._export_in_background(mirrored, fresh, 0, 3)
    fresh.fresh_networks_each_task = False
    assert not loop._export_in_background(fresh.config, fresh, 0, 3)
