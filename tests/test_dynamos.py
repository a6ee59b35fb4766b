"""Dynamos on the engine (dgm_tf.methods.dynamos): runs, its buffer in a real run, the
export, exact resume after a kill mid-task, flags and flagfiles.

Reference: arXiv 2301.00620, github NeurAI-Lab/DynamicContinualLearning.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dgm_tf import engine
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config, ConfigError
from dgm_tf.data import to_model_images
from dgm_tf.engine import build_scenario
from dgm_tf.methods import dynamos
from dgm_tf.methods import dynamos_core as core
from tests.dgm_helpers import assert_same_run, mock_labelled_tfds, train_task_with_hook
from tests.test_cli import REPO, parse_flags, run_cli

# Two tasks of two Fashion-MNIST classes (embedded sample), 30 training images per class:
# 6 batches of 10 per epoch, 2 epochs per task; the first epoch of the run is the ungated
# warm-up (--dynamos_warmup=1). Buffer of 24, buffer batches of 6, nf 8.
TINY = dict(method="dynamos", dataset="embedded", class_order=(0, 1, 2, 3), classes_per_task=2,
            train_examples_per_class=30, batch_size=10, epochs=2, eval_every=1, replay_buffer=24,
            dynamos_buffer_batch=6, dynamos_nf=8, dynamos_warmup=1, keep_checkpoints=2)


class _Killed(Exception):
    """Stands for a SIGKILL at a chosen batch."""


def _raise_killed():
    raise _Killed()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted tiny run, and its method (kept after the run) for inspection."""
    workdir = tmp_path_factory.mktemp("dynamos") / "wd"
    kept = {}
    original_end = dynamos.Dynamos.end_task

    def end_task(self, task):
        original_end(self, task)
        kept["method"] = self
        kept.setdefault("buffers", []).append(self.memory.state())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamos.Dynamos, "end_task", end_task)
        results = engine.run_experiment(Config(**TINY), workdir)
    return results, workdir, kept


def test_a_run_fills_the_buffer_with_correctly_classified_training_images_only(reference_run):
    results, workdir, kept = reference_run
    method = kept["method"]
    scenario = method.scenario
    assert results["tasks"] == [[0, 1], [2, 3]] and results["tasks_completed"] == 2
    states = results["method_state"]
    # Offered: every sample after the warm-up epoch (6 batches of 10), i.e. task 0's
    # second epoch and both epochs of task 1: 60 + 120.
    assert [s["buffer_seen"] for s in states] == [60, 180]
    for state, buffer in zip(states, kept["buffers"]):
        filled = buffer["filled"]
        assert state["buffer_filled"] == int(filled.sum()) <= 24
        assert sum(state["buffer_per_class"]) == state["buffer_filled"]
        # Every stored row was classified correctly by the logits stored with it.
        for slot in np.flatnonzero(filled):
            width = buffer["widths"][slot]
            assert np.argmax(buffer["logits"][slot, :width]) == buffer["labels"][slot]
    assert states[0]["buffer_filled"] > 12  # the fill phase wrote most of its first 24
    assert len(states[0]["buffer_per_class"]) == 2 and len(states[1]["buffer_per_class"]) == 4  # per seen class
    print("buffer per class after each task:", [s["buffer_per_class"] for s in states])
    # The reservoir keeps the first task's classes while the second's arrive.
    assert sum(states[1]["buffer_per_class"][:2]) > 0 and sum(states[1]["buffer_per_class"][2:]) > 0
    # Stored images are the tasks' training images, unaugmented and unchanged.
    buffer = kept["buffers"][-1]
    train = np.concatenate([t.x_train for t in scenario.tasks])
    for slot in np.flatnonzero(buffer["filled"]):
        matches = np.flatnonzero((train == buffer["examples"][slot]).all(axis=(1, 2, 3)))
        assert matches.size >= 1, slot
    # The inference gates keep a share of the channels (the policy is trained).
    assert all(0.0 < s["gate_keep_fraction"] <= 1.0 for s in states)
    # 12 steps per task do not train this network past chance (task-aware 0.49 with oneDNN
    # on, 0.59 off, on an AVX-512 EPYC); test_dynamos_learns_two_tasks_... checks learning.
    assert 0.0 <= results["average_accuracy"][-1] <= 1.0
    assert 0.0 <= results["task_aware_average_accuracy"][-1] <= 1.0


def test_dynamos_learns_two_tasks_well_above_chance(tmp_path):
    """Two 2-class tasks, 100 images per class, 5 epochs (50 steps per task): the
    task-aware accuracy after the second task is well above the 0.5 of chance. Measured
    0.89-0.90 on an AVX-512 EPYC with oneDNN on and off; the first task's own accuracy
    right after it varied 0.75-0.87 (README: inference BatchNorm fragility), so only the
    final average, over both tasks, is held, with a margin of 0.2."""
    config = Config(**dict(TINY, train_examples_per_class=100, epochs=5, eval_every=5))
    results = engine.run_experiment(config, tmp_path / "wd")
    assert results["tasks_completed"] == 2
    assert results["task_aware_average_accuracy"][-1] > 0.7, results["task_aware_average_accuracy"]


def test_the_exported_classifier_runs_gated_and_matches_the_in_process_one(reference_run, tmp_path):
    """The SavedModel of the last task, loaded in a process that imports only
    TensorFlow, gives the in-process classifier's probabilities (gates thresholded, so
    both are deterministic); the buffer's images are not in it."""
    _, workdir, kept = reference_run
    method = kept["method"]
    raw = np.concatenate([t.x_test[:16] for t in method.scenario.tasks])  # float32 [-1, 1], 32x32
    logits = method.classifier_logits(raw)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.save(tmp_path / "images.npy", raw)
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        import sys, numpy as np, tensorflow as tf
        model = tf.saved_model.load(sys.argv[1])
        images = np.load(sys.argv[2])
        out = [model.signatures["serving_float"](images=tf.constant(images))["probabilities"].numpy()
               for _ in range(2)]
        np.save(sys.argv[3], np.stack(out))
        print(any(m.startswith("dgm_tf") for m in sys.modules))
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(workdir / "export" / "classifier" / "2"),
                           str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
    served = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(served[0], served[1])  # deterministic at inference
    np.testing.assert_allclose(served[0], expected, atol=1e-5)
    classes = json.loads((workdir / "export" / "classifier" / "2" / "classes.json").read_text())
    assert len(classes["classes"]) == 4 and served.shape[-1] == 4
    # No variable of the export holds the buffer.
    exported = tf_variable_shapes(workdir / "export" / "classifier" / "2")
    assert not any(name.startswith("dynamos_buffer") for name in exported), exported


def tf_variable_shapes(path):
    import tensorflow as tf

    return [name for name, _ in tf.train.list_variables(str(path / "variables" / "variables"))]


def _final(workdir):
    results = json.loads((workdir / "results.json").read_text())
    for key in ("wall_time_s", "time_breakdown_s"):
        results.pop(key)
    latest = CheckpointManager(workdir / "ckpt").latest()
    assert latest.state["phase"] == "task_end" and latest.state["task"] == 1
    return results, latest


def test_a_run_killed_mid_task_resumes_to_the_same_run(reference_run, tmp_path, monkeypatch):
    """Killed inside task 2's second epoch: the newest checkpoint is then its first
    epoch's (network, optimizer step and a buffer mid-stream). Resumed, the run ends
    with the uninterrupted run's results.json (times aside), weights and buffer, bit
    for bit: the data order, the gate noise and the buffer's draws are keyed by (seed,
    task, epoch or step), nothing random is carried in memory."""
    _, reference, _ = reference_run
    workdir = tmp_path / "wd"
    config = Config(**TINY)
    monkeypatch.setattr(dynamos.Dynamos, "train_task",
                        train_task_with_hook(dynamos.Dynamos.train_task, (1, 1, 3), _raise_killed))
    with pytest.raises(_Killed):
        engine.run_experiment(config, workdir)
    latest = CheckpointManager(workdir / "ckpt").latest().state
    assert (latest["phase"], latest["task"], latest["epochs_done"]) == ("epoch", 1, 1)
    monkeypatch.undo()
    engine.run_experiment(config, workdir, resume=True)
    (results_a, latest_a), (results_b, latest_b) = _final(reference), _final(workdir)
    assert results_a == results_b
    assert sorted(latest_a.arrays) == sorted(latest_b.arrays)
    assert sum(k.startswith("dynamos/buffer/") for k in latest_a.arrays) == 7
    for key in latest_a.arrays:
        np.testing.assert_array_equal(latest_a.arrays[key], latest_b.arrays[key], err_msg=key)


def test_dynamos_flags_are_validated_with_one_line_naming_the_flag():
    base = dict(method="dynamos", dataset="embedded", replay_buffer=20)
    for changes, flag in (
        (dict(replay_buffer=0), "--replay_buffer"),
        (dict(dynamos_buffer_batch=21), "--dynamos_buffer_batch"),
        (dict(dynamos_lr=0.0), "--dynamos_lr"),
        (dict(dynamos_keep_ratio=1.5), "--dynamos_keep_ratio"),
        (dict(dynamos_alpha=-1.0), "--dynamos_alpha"),
        (dict(dynamos_warmup=-1), "--dynamos_warmup"),
        (dict(classifier="cnn"), "--classifier"),
        (dict(precision="mixed_bfloat16"), "--precision"),
    ):
        with pytest.raises(ConfigError) as e:
            Config(**dict(base, **changes))
        assert str(e.value).startswith(flag) and "\n" not in str(e.value), str(e.value)
    Config(**base)  # valid


FLAGFILES = {
    "seq_mnist_dynamos_b500.cfg": "seq_mnist_b500", "seq_mnist_dynamos_b1000.cfg": "seq_mnist_b1000",
    "seq_mnist_dynamos_b2000.cfg": "seq_mnist_b2000", "svhn_dynamos.cfg": "seq_svhn_b500",
    "svhn_dynamos_b1000.cfg": "seq_svhn_b1000", "svhn_dynamos_b2000.cfg": "seq_svhn_b2000",
    "split_fmnist_5x2_dynamos.cfg": "seq_mnist_b500", "quickstart_dynamos.cfg": "seq_mnist_b500",
}


@pytest.mark.parametrize("name", sorted(FLAGFILES))
def test_shipped_flagfiles_carry_the_reference_best_settings(name):
    config = parse_flags(f"--flagfile={REPO / 'configs' / name}", "--workdir=unused")
    best = core.BEST_SETTINGS[FLAGFILES[name]]
    got = (config.method, config.replay_buffer, config.dynamos_lr, config.batch_size, config.dynamos_buffer_batch,
           config.epochs, config.dynamos_alpha, config.dynamos_beta, config.dynamos_policy_alpha,
           config.dynamos_policy_penalty, config.dynamos_reward_weight, config.dynamos_prototype_weight,
           config.dynamos_keep_ratio, config.dynamos_nf, config.dynamos_warmup > 0)
    want = ("dynamos", best.buffer_size, best.lr, best.batch_size, best.buffer_batch_size, best.epochs, best.alpha,
            best.beta, best.policy_alpha, best.policy_penalty, best.reward_weight, best.prototype_weight,
            best.keep_ratio, best.nf, best.warmup)
    assert got == want
    assert (config.classes_per_task, config.num_tasks) == (2, 5)
    assert config.dynamos_warmup == core.WARMUP


def test_svhn_flagfile_runs_on_mocked_tfds_data(tmp_path):
    """``configs/svhn_dynamos.cfg``, shrunk (2 tasks, one epoch, nf 4), on mocked
    svhn_cropped data: three-channel images through the gated ResNet, end to end."""
    config = parse_flags(f"--flagfile={REPO / 'configs' / 'svhn_dynamos.cfg'}", "--workdir=unused")
    assert config.dataset == "tfds:svhn_cropped"
    tiny = dataclasses.replace(config, data_dir=str(tmp_path), num_tasks=2, epochs=1, dynamos_nf=4,
                               batch_size=4, dynamos_buffer_batch=4, replay_buffer=8, dynamos_warmup=2,
                               export=False)
    with mock_labelled_tfds(40, 2):
        scenario = build_scenario(tiny)
        assert scenario.image_shape == (32, 32, 3)
        results = engine.run_experiment(tiny, tmp_path / "wd")
    assert results["tasks"] == [[0, 1], [2, 3]] and results["tasks_completed"] == 2
    assert results["method_state"][-1]["buffer_filled"] <= 8


def test_model_images_are_what_the_buffer_stores():
    """The engine's images (to_model_images: 32x32 in [-1, 1]) are the buffer's rows."""
    scenario = build_scenario(Config(**TINY))
    x = scenario.tasks[0].x_train
    assert x.shape[1:] == (32, 32, 1) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert to_model_images(np.zeros((1, 28, 28, 1), np.uint8)).shape == (1, 32, 32, 1)


CLI_TINY = ["--method=dynamos", "--dataset=embedded", "--class_order=0,1,2,3", "--classes_per_task=2",
            "--train_examples_per_class=30", "--batch_size=10", "--epochs=2", "--eval_every=1", "--replay_buffer=24",
            "--dynamos_buffer_batch=6", "--dynamos_nf=8", "--dynamos_warmup=1"]


@pytest.mark.slow
def test_sigkilled_mid_task_the_cli_run_resumes_to_the_same_run(tmp_path):
    """SIGKILL (tests/kill_driver.py) before batch 3 of task 2's second epoch, export on:
    the resumed CLI run ends with the uninterrupted one's results.json (times aside),
    arrays (the buffer's included) and exports."""
    onednn = os.environ["TF_ENABLE_ONEDNN_OPTS"]  # kill_driver inherits it; compared runs share kernels
    reference = tmp_path / "ref"
    proc = run_cli(*CLI_TINY, f"--workdir={reference}", onednn_env=onednn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "wd"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "kill_driver.py"), "dynamos_batch:1:1:3", *CLI_TINY,
                           f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_cli(*CLI_TINY, f"--workdir={workdir}", "--resume", onednn_env=onednn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task 2, 1 epochs done" in proc.stderr, proc.stderr[-2000:]
    assert_same_run(reference, workdir)
    assert sorted(p.name for p in (workdir / "export" / "classifier").iterdir()) == ["1", "2"]
