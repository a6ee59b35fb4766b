"""--restore_best: each task ends with the classifier of its best validation epoch.

Validation accuracy is scripted (``Script``: the ``evaluate`` the validation selection
calls, ``dgm_tf.engine.callbacks.evaluate``, answers "val" from a table), so which epoch
is best does not depend on training noise or the CPU: task 0's best epoch is its first,
task 1's its second, and the last never is. At every epoch end the script also records
the classifier's logits on the seen tasks' test images, straight from the method: the
snapshot the export, the end-of-task figures and the next task's start are compared with.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dgm_tf import engine
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config, ConfigError
from dgm_tf.methods import make_method
from dgm_tf.models.classifier import build_classifier, classifier_variables, network_logits
from dgm_tf.methods.mas import mas_importance
from tests.test_cli import REPO

EPOCHS = 3
# Mean validation accuracy per task and epoch; the best epoch is never the last.
VALIDATION = {0: (0.9, 0.5, 0.7), 1: (0.5, 0.9, 0.7)}
BEST = {0: 0, 1: 1}
LAST = EPOCHS - 1
# Two tasks of two classes (trouser, sneaker | bag, T-shirt), 4 steps per epoch; a
# high learning rate so that consecutive epochs' classifiers differ clearly.
BASE = dict(
    dataset="embedded", class_order=(1, 7, 8, 0), classes_per_task=2, epochs=EPOCHS,
    train_examples_per_class=32, batch_size=16, ndf=4, nz=16, ngf=2, eval_every=1, lr_d=0.01,
    samples_per_class=2, mas_lambda=100.0, keep_checkpoints=100,
)


def tiny_config(method, **overrides):
    return Config(method=method, **{**BASE, **overrides})


class Script:
    """Scripted validation and per-epoch snapshots, installed with ``setattr``
    (``monkeypatch.setattr`` in this process, plain ``setattr`` in a driver)."""

    def __init__(self, validation=VALIDATION):
        self.validation = validation
        self.epoch = None
        self.logits = {}  # (task, epoch) -> logits on the seen tasks' test images, at the epoch's end
        self.weights = {}  # (task, epoch) -> the classifier network's variables
        self.start = {}  # task -> logits before its first step

    def install(self, set_attr, snapshots=True):
        script = self
        original_evaluate = engine.evaluate
        original_end = engine.ValidationSelection.on_epoch_end
        original_begin = engine.ValidationSelection.on_epoch_begin

        def evaluate(method, tasks, split):
            if split != "val":
                return original_evaluate(method, tasks, split)
            value = script.validation[len(tasks) - 1][script.epoch]
            return [value] * len(tasks), [value] * len(tasks)

        def test_logits(selection):
            x = np.concatenate([t.x_test for t in selection.tasks])
            return selection.method.classifier_logits(x)

        def on_epoch_begin(selection, epoch, logs=None):
            if snapshots and epoch == 0:
                script.start[len(selection.tasks) - 1] = test_logits(selection)
            return original_begin(selection, epoch, logs)

        def on_epoch_end(selection, epoch, logs=None):
            script.epoch = epoch
            if snapshots:
                key = (len(selection.tasks) - 1, epoch)
                script.logits[key] = test_logits(selection)
                network = selection.method.classifier_for_export()[0]
                script.weights[key] = [v.numpy().copy() for v in network.weights]
            return original_end(selection, epoch, logs)

        set_attr(engine.callbacks, "evaluate", evaluate)  # where ValidationSelection looks it up
        set_attr(engine.ValidationSelection, "on_epoch_end", on_epoch_end)
        set_attr(engine.ValidationSelection, "on_epoch_begin", on_epoch_begin)


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """``(method, restore_best=True, **config overrides) -> (config, workdir, results,
    script)``: a scripted run, made once per module for each set of arguments."""
    runs = {}

    def run(method, restore_best=True, **overrides):
        key = (method, restore_best, tuple(sorted(overrides.items())))
        if key not in runs:
            config = tiny_config(method, restore_best=restore_best, **overrides)
            workdir = tmp_path_factory.mktemp(method) / "wd"
            script = Script()
            with pytest.MonkeyPatch.context() as mp:
                script.install(mp.setattr)
                engine.run_experiment(config, workdir)
            runs[key] = (config, workdir, json.loads((workdir / "results.json").read_text()), script)
        return runs[key]

    return run


def softmax(logits):
    return tf.nn.softmax(logits, axis=-1).numpy()


def served_probabilities(workdir, version, images):
    model = tf.saved_model.load(str(workdir / "export" / "classifier" / str(version)))
    return model.signatures["serving_float"](images=tf.constant(images))["probabilities"].numpy()


def test_time_breakdown_still_adds_up(scripted_run):
    _, _, results, _ = scripted_run("mas")
    for wall, phases in zip(results["wall_time_s"], results["time_breakdown_s"]):
        assert sum(phases.values()) == pytest.approx(wall, abs=0.01)
        assert min(phases.values()) >= -0.01


# --------------------------------------------------------------------------------------
# What is exported, evaluated and reported.
# --------------------------------------------------------------------------------------


# The default suite runs MAS (its classifier carries over and end_task consolidates
# it) and, for --norestore_best, one task of finetune (nothing is restored to carry
# over). Fine-tune's run shares MAS's code path (ClassifierBaseline); DGMw's runs are
# slow (a DGM step traces ~4 s per task) and its hooks are checked without training
# below (test_classifier_weights_are_all_the_state_...).
ONE_TASK = {"num_tasks": 1}
FINETUNE = pytest.param("finetune", {}, marks=pytest.mark.slow, id="finetune")
DGMW_NOREINIT = pytest.param("dgmw", {"reinit_d": False}, marks=pytest.mark.slow, id="dgmw-noreinit_d")


@pytest.mark.parametrize(
    "method, restore_best, overrides",
    [
        ("mas", True, {}),
        ("finetune", False, ONE_TASK),
        pytest.param("finetune", True, {}, marks=pytest.mark.slow, id="finetune-True"),
        pytest.param("dgmw", True, {"reinit_d": False}, marks=pytest.mark.slow, id="dgmw-noreinit_d-True"),
        pytest.param("dgmw", False, ONE_TASK, marks=pytest.mark.slow, id="dgmw-False"),
    ],
)
def test_the_export_serves_the_selected_epochs_classifier(scripted_run, method, restore_best, overrides):
    config, workdir, results, script = scripted_run(method, restore_best, **overrides)
    scenario = engine.build_scenario(config)
    for t in range(results["tasks_completed"]):
        x = np.concatenate([task.x_test for task in scenario.tasks[: t + 1]])
        served = served_probabilities(workdir, t + 1, x)
        best, last = softmax(script.logits[t, BEST[t]]), softmax(script.logits[t, LAST])
        # Informative only if the two epochs' classifiers differ by far more than the
        # tolerance: the largest probability change was 0.08 to 0.70 (MAS and
        # finetune, seeds 0-2, oneDNN on and off); the export matched its epoch's
        # classifier to 0.0 in all of them.
        assert np.max(np.abs(best - last)) > 0.02
        expected = best if restore_best else last
        np.testing.assert_allclose(served, expected, atol=2e-5, err_msg=f"task {t}")


@pytest.mark.parametrize("method, restore_best, overrides", [("mas", True, {}), ("finetune", False, ONE_TASK)])
def test_results_hold_the_selected_and_the_last_epochs_figures(scripted_run, method, restore_best, overrides):
    config, workdir, results, script = scripted_run(method, restore_best, **overrides)
    scenario = engine.build_scenario(config)
    tasks = results["tasks_completed"]
    assert results["best_validation_epoch"] == [BEST[t] + 1 for t in range(tasks)]
    assert results["selected_epoch"] == [BEST[t] + 1 if restore_best else EPOCHS for t in range(tasks)]
    assert results["config"]["restore_best"] is restore_best

    def accuracies(logits, t):
        rows, offset = [], 0
        for task in scenario.tasks[: t + 1]:
            n = len(task.y_test)
            rows.append(float(np.mean(np.argmax(logits[offset : offset + n], axis=1) == task.y_test)))
            offset += n
        return rows

    for t in range(tasks):
        n = min(len(task.y_test) for task in scenario.tasks)
        # One test image either way: the snapshot's batches are not evaluate()'s.
        close = dict(abs=1.5 / n)
        assert results["last_epoch_accuracy_matrix"][t][: t + 1] == pytest.approx(
            accuracies(script.logits[t, LAST], t), **close)
        assert results["best_validation_accuracy_matrix"][t][: t + 1] == pytest.approx(
            accuracies(script.logits[t, BEST[t]], t), **close)
    kept = "best_validation" if restore_best else "last_epoch"
    # The kept classifier's figures are the reported ones, from the same computation.
    assert results["accuracy_matrix"] == results[f"{kept}_accuracy_matrix"]
    assert results["average_accuracy"] == results[f"{kept}_average_accuracy"]
    if not restore_best:
        assert results["task_aware_accuracy_matrix"] == results["last_epoch_task_aware_accuracy_matrix"]
        assert results["task_aware_average_accuracy"] == results["last_epoch_task_aware_average_accuracy"]
    if restore_best:
        # The scenario separates the two classifiers in the reported figures (task 2's
        # row by 6 to 11 test images for MAS, 9 to 33 for finetune, over seeds 0-2,
        # oneDNN on and off).
        assert results["last_epoch_accuracy_matrix"] != results["best_validation_accuracy_matrix"]


def test_tensorboard_shows_the_last_epochs_figure_and_the_kept_epoch(scripted_run):
    from tensorboard.backend.event_processing import event_accumulator as ea

    _, workdir, results, _ = scripted_run("mas")
    acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={ea.TENSORS: 0})
    acc.Reload()

    def scalars(tag):
        return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]

    assert scalars("eval/last_epoch_A_t") == [
        (t + 1, pytest.approx(a)) for t, a in enumerate(results["last_epoch_average_accuracy"])]
    assert scalars("eval/selected_epoch") == [(t + 1, e) for t, e in enumerate(results["selected_epoch"])]
    assert scalars("eval/A_t") == [(t + 1, pytest.approx(a)) for t, a in enumerate(results["average_accuracy"])]


# --------------------------------------------------------------------------------------
# Methods whose classifier carries over start the next task from the restored one.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, overrides", [("mas", {}), FINETUNE, DGMW_NOREINIT])
def test_the_next_task_starts_from_the_restored_classifier(scripted_run, method, overrides):
    config, _, _, script = scripted_run(method, **overrides)
    n0 = len(engine.build_scenario(config).tasks[0].y_test)
    start = script.start[1][:n0, :2]  # task 0's images, task 0's classes (the head grew)
    best, last = script.logits[0, BEST[0]], script.logits[0, LAST]
    # Measured (seeds 0-2, oneDNN on and off): best and last epoch 0.30 to 0.74 apart
    # in the largest logit, the next task's start within 2.4e-7 of the best epoch (0.0
    # with oneDNN; the wider head's matrix product rounds differently without it).
    assert np.max(np.abs(best - last)) > 0.05
    np.testing.assert_allclose(start, best, atol=1e-5)


@pytest.mark.slow
def test_dgm_with_a_fresh_discriminator_per_task_trains_every_task_as_before(scripted_run):
    """With --reinit_d (the default) nothing of the restored discriminator reaches the
    next task: both settings train the same generator and last-epoch classifiers, and
    restoring reports what --norestore_best reports as the best validation figure."""
    _, workdir_a, restored, _ = scripted_run("dgmw", True, export=False)
    _, workdir_b, kept_last, _ = scripted_run("dgmw", False, export=False)
    assert restored["last_epoch_accuracy_matrix"] == kept_last["accuracy_matrix"]
    assert restored["accuracy_matrix"] == kept_last["best_validation_accuracy_matrix"]
    arrays_a, arrays_b = _final_checkpoint(workdir_a), _final_checkpoint(workdir_b)
    generator = [k for k in arrays_a if k.startswith(("generator/", "reserved/"))]
    assert len(generator) > 20
    for key in generator:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


def test_mas_consolidates_the_restored_classifier(scripted_run):
    config, workdir, _, script = scripted_run("mas")
    scenario = engine.build_scenario(config)
    checkpoints = sorted(p for p in (workdir / "ckpt").iterdir() if p.name.isdigit())
    states = [json.loads((p / "state.json").read_text()) for p in checkpoints]
    (end_of_task_0,) = [p for p, s in zip(checkpoints, states) if (s["phase"], s["task"]) == ("task_end", 0)]
    with np.load(end_of_task_0 / "arrays.npz") as npz:
        arrays = dict(npz)
    # The network as restored: every variable (BN statistics included) is the best epoch's.
    network = build_classifier("dgm", config.ndf, 2, scenario.image_shape[-1])
    best_weights = script.weights[0, BEST[0]]
    assert len(network.weights) == len(best_weights)
    for i, value in enumerate(best_weights):
        np.testing.assert_array_equal(arrays[f"classifier/{i:04d}"], value)
        network.weights[i].assign(value)
    variables = classifier_variables(network)
    # theta* is the restored parameters ...
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(arrays[f"mas/theta_star/{i:04d}"], v.numpy())
    # ... and the importance (Omega after the first task) was measured at them.
    importance = mas_importance(lambda x: network_logits(network, x, training=False), variables,
                                scenario.tasks[0].x_train)
    for i, expected in enumerate(importance):
        np.testing.assert_allclose(arrays[f"mas/omega/{i:04d}"], expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["dgmw", "finetune"])
def test_classifier_weights_are_all_the_state_its_predictions_depend_on(tiny_scenario, method):
    """What ValidationSelection keeps and puts back: every variable, BN statistics
    included, so the restored classifier predicts exactly as it did."""
    config = Config(method=method, class_order=(1, 7, 8), nz=16, ngf=2, ndf=4, train_examples_per_class=64)
    model = make_method(config, tiny_scenario)
    model.begin_task(tiny_scenario.tasks[0])
    network = model.classifier_for_export()[0]
    assert len(network.non_trainable_weights) > 0  # the BN moving statistics
    kept = model.classifier_weights()
    x = tiny_scenario.tasks[0].x_test[:64]
    before = model.classifier_logits(x)
    rng = np.random.default_rng(0)
    for v in network.weights:  # every variable moves (variances stay positive)
        v.assign(np.asarray(v.numpy() * rng.uniform(0.5, 1.5, v.shape) + rng.uniform(0, 0.1, v.shape), np.float32))
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(kept, network.weights))
    assert np.max(np.abs(model.classifier_logits(x) - before)) > 1e-3
    model.set_classifier_weights(kept)
    np.testing.assert_array_equal(model.classifier_logits(x), before)
    assert len(kept) == len(network.weights)
    for a, v in zip(kept, network.weights):
        np.testing.assert_array_equal(v.numpy(), a, err_msg=v.path)
    # The copies are the method's own: changing the network later leaves them alone.
    network.weights[0].assign(network.weights[0] + 1.0)
    assert not np.array_equal(kept[0], network.weights[0].numpy())
    with pytest.raises(ValueError, match="arrays for"):
        model.set_classifier_weights(kept[:-1])


# --------------------------------------------------------------------------------------
# Which epoch wins.
# --------------------------------------------------------------------------------------


class _EpochMarked:
    """A stand-in method whose classifier is the number of the epoch it was trained to."""

    def __init__(self):
        self.epoch, self.restored = None, None

    def classifier_weights(self):
        return [np.array(self.epoch)]

    def set_classifier_weights(self, weights):
        self.restored = int(weights[0])


@pytest.mark.parametrize(
    "validation, every, evaluated, best",
    [
        ((0.5, 0.8, 0.8, 0.6), 1, [0, 1, 2, 3], 1),  # a tie: the earliest stays
        ((0.7, 0.7, 0.7), 1, [0, 1, 2], 0),  # all equal: the first
        # --eval_every > epochs: the first and the last epoch are the candidates.
        ((0.5, 0.6, 0.9), 5, [0, 2], 2),
        ((0.9, 0.95, 0.6), 5, [0, 2], 0),
        ((0.4,), 5, [0], 0),  # one epoch: the first is the last
        ((0.5, 0.1, 0.6, 0.9, 0.6), 2, [0, 2, 4], 2),  # epoch 3 is never validated
        ((0.2, 0.3, 0.4, 0.5), 2, [0, 2, 3], 3),  # the last is validated off the cadence
    ],
)
def test_which_epoch_wins(monkeypatch, validation, every, evaluated, best):
    method, seen = _EpochMarked(), []

    def evaluate(m, tasks, split):
        assert split == "val"
        seen.append(m.epoch)
        return [validation[m.epoch]] * len(tasks), None

    monkeypatch.setattr(engine.callbacks, "evaluate", evaluate)
    selection = engine.ValidationSelection(method, [None, None], every=every, epochs=len(validation))
    for epoch in range(len(validation)):
        method.epoch = epoch
        selection.on_epoch_end(epoch, {})
    assert seen == evaluated
    assert selection.best_epoch == best and selection.best_val == validation[best]
    assert selection.restore_best() == best and method.restored == best


def test_a_selection_without_kept_weights_keeps_the_last_epoch():
    """A task resumed from a checkpoint of a version that kept only the test row."""
    method = _EpochMarked()
    selection = engine.ValidationSelection(method, [None], every=1, epochs=4)
    selection.restore({"best_val": 0.8, "best_epoch": 1, "best_test": [0.75]}, {})
    assert selection.restore_best() == 3 and method.restored is None
    assert selection.finish([0.5]) == [0.75]


# --------------------------------------------------------------------------------------
# Exact resume.
# --------------------------------------------------------------------------------------

# Runs dgm_tf.main (its flags after -c) with the script installed, and SIGKILLs itself as
# epoch {epoch} of task {task} begins: that task's newest checkpoint is then the epoch
# before's (as tests/kill_driver.py does, which cannot install the script).
_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from dgm_tf import engine, main
from tests.kill_driver import die
from tests.test_restore_best import Script

Script().install(setattr, snapshots=False)
original = engine.NonFiniteGuard.on_epoch_begin

def on_epoch_begin(self, epoch, logs=None):
    if (self.task, epoch) == ({task}, {epoch}):
        die(settle=True)  # the previous epoch's checkpoint on disk first (engine/writer.py)
    return original(self, epoch, logs)

engine.NonFiniteGuard.on_epoch_begin = on_epoch_begin
sys.argv = ["dgm_tf.main"] + sys.argv[1:]
main.run()
"""


def _final_checkpoint(workdir):
    latest = CheckpointManager(workdir / "ckpt").latest()
    assert (latest.state["phase"], latest.state["task"]) == ("task_end", 1)
    return latest.arrays


def test_a_run_killed_after_the_best_epoch_resumes_to_the_same_classifier(scripted_run, tmp_path, monkeypatch):
    config, reference, expected, _ = scripted_run("mas")
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text("\n".join(config.to_flags()) + "\n")
    workdir = tmp_path / "wd"
    # Killed as the last epoch of task 0 begins: its newest checkpoint holds epoch 1's
    # weights, and epoch 0's (the best) only as the selection's copy.
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER.format(repo=str(REPO), task=0, epoch=LAST), f"--flagfile={flagfile}",
         f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    latest = CheckpointManager(workdir / "ckpt").latest()
    assert (latest.state["phase"], latest.state["task"], latest.state["epochs_done"]) == ("epoch", 0, LAST)
    assert latest.state["selection"]["best_epoch"] == BEST[0]
    kept = sorted(k for k in latest.arrays if k.startswith("selection/best/"))
    assert kept and any(not np.array_equal(latest.arrays[k], latest.arrays[k.replace("selection/best/", "classifier/")])
                        for k in kept)
    Script().install(monkeypatch.setattr, snapshots=False)
    results = engine.run_experiment(config, workdir, resume=True)
    assert results["selected_epoch"] == [BEST[0] + 1, BEST[1] + 1]
    for key in set(expected) - {"wall_time_s", "time_breakdown_s"}:
        assert results[key] == expected[key], key
    for wall, phases in zip(results["wall_time_s"], results["time_breakdown_s"]):
        assert sum(phases.values()) == pytest.approx(wall, abs=0.01)
    arrays_a, arrays_b = _final_checkpoint(reference), _final_checkpoint(workdir)
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:  # classifier, MAS's Omega and theta*: bit for bit
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


# --------------------------------------------------------------------------------------
# Runs written before --restore_best existed.
# --------------------------------------------------------------------------------------


def _flags_file(tmp_path, config, drop=()):
    lines = [line for line in config.to_flags() if line.split("=")[0].lstrip("-") not in drop]
    (tmp_path / "flags.txt").write_text("\n".join(lines) + "\n")


def test_a_run_that_predates_the_flag_resumes_with_either_value(tmp_path):
    _flags_file(tmp_path, Config(), drop={"restore_best"})
    for value in (True, False):
        engine.check_resume(tmp_path, Config(restore_best=value))
    # A run that names it keeps it, as every other flag.
    _flags_file(tmp_path, Config())
    with pytest.raises(ConfigError, match="--restore_best: run has True, now False"):
        engine.check_resume(tmp_path, Config(restore_best=False))


def test_rows_of_a_checkpoint_that_predates_the_flag_are_the_last_epochs(tmp_path):
    rows = {"acc": [[0.5], [0.25, 0.75]], "aware": [[1.0], [0.5, 1.0]], "best": [[0.5], [0.5, 0.5]]}
    engine.resume._rows_before_restore_best(rows, Config(epochs=7), tmp_path)
    assert rows["last_acc"] == rows["acc"] and rows["last_aware"] == rows["aware"]
    assert rows["last_acc"] is not rows["acc"]
    assert rows["selected_epoch"] == [7, 7] and rows["best_epoch"] == [None, None]


# A whole resume (task 2 trained again); the two pieces above run in the default suite.
@pytest.mark.slow
def test_a_checkpoint_that_predates_the_flag_reports_its_tasks_as_last_epoch(scripted_run, tmp_path, monkeypatch):
    config, reference, _, _ = scripted_run("finetune")
    workdir = tmp_path / "wd"
    shutil.copytree(reference, workdir)
    # Back to the end of task 0, as the code before --restore_best wrote it: no new
    # rows, no flag (what it held is immaterial here; what the resume reports is).
    checkpoints = sorted(p for p in (workdir / "ckpt").iterdir() if p.name.isdigit())
    states = [json.loads((p / "state.json").read_text()) for p in checkpoints]
    end_0 = [(s["phase"], s["task"]) for s in states].index(("task_end", 0))
    state = states[end_0]
    for key in ("last_acc", "last_aware", "best_epoch", "selected_epoch"):
        del state["engine"][key]
    del state["config"]["restore_best"]
    (checkpoints[end_0] / "state.json").write_text(json.dumps(state))
    for path in checkpoints[end_0 + 1 :]:
        shutil.rmtree(path)
    _flags_file(workdir, config, drop={"restore_best"})
    (workdir / "results.json").unlink()
    Script().install(monkeypatch.setattr, snapshots=False)
    results = engine.run_experiment(config, workdir, resume=True)
    assert results["selected_epoch"] == [EPOCHS, BEST[1] + 1]
    assert results["best_validation_epoch"] == [None, BEST[1] + 1]
    assert results["last_epoch_accuracy_matrix"][0] == results["accuracy_matrix"][0]
    assert results["last_epoch_accuracy_matrix"][1] != results["accuracy_matrix"][1]
