"""TensorBoard summaries read back from the event files and through a real TensorBoard
server; console verbosity."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator as ea

from dgm_tf.monitoring import accuracy_matrix_image
from tests.test_cli import DGM_RUN, run_cli

# Three one-class tasks, 2 epochs of 2 iterations, logged every step, validated every epoch.
ARGS = DGM_RUN


@pytest.fixture(scope="module")
def run(dgm_cli_run):
    """The shared CLI run (tests/conftest.py) and its TensorBoard events, read back."""
    workdir, proc = dgm_cli_run
    acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    results = json.loads((workdir / "results.json").read_text())
    return workdir, acc, results, proc


def _values(acc, tag):
    return [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def _scalars(acc, tag):
    return [(step, float(v)) for step, v in _values(acc, tag)]


def test_training_scalars_per_step_and_per_epoch(run):
    _, acc, _, _ = run
    tags = set(acc.Tags()["tensors"])
    for t in (1, 2, 3):
        for name in ("d_loss", "g_loss", "gradient_penalty", "wasserstein", "c_loss", "c_acc", "mask_reg", "s",
                     "lambda_mask"):
            assert f"task_{t}/train/{name}" in tags and f"task_{t}/epoch/{name}" in tags, (t, name)
        assert f"task_{t}/epoch/c_acc_real" in tags and f"task_{t}/epoch/val_acc" in tags
    # Replayed data exists from task 2 on only.
    assert "task_1/epoch/c_acc_replay" not in tags and "task_2/epoch/c_acc_replay" in tags
    # 32 images / batch 16 = 2 iterations per epoch, 2 epochs, logged every step.
    steps = [s for s, _ in _scalars(acc, "task_1/train/g_loss")]
    assert steps == [1, 2, 3, 4]
    assert [s for s, _ in _scalars(acc, "task_2/train/g_loss")] == [5, 6, 7, 8]
    s_values = [v for _, v in _scalars(acc, "task_1/train/s")]
    assert all(b >= a for a, b in zip(s_values[2:], s_values[3:]))  # s grows within the last epoch
    assert 0.0 <= min(v for _, v in _scalars(acc, "task_2/epoch/c_acc_replay")) <= 1.0
    assert all(np.isfinite(v) for _, v in _scalars(acc, "task_3/train/d_loss"))
    lam = [v for _, v in _scalars(acc, "task_1/train/lambda_mask")]
    assert lam == pytest.approx([0.08] * 4)  # the default, unscaled at task 1


def test_mask_histograms_lie_in_0_1(run):
    _, acc, _, _ = run
    for layer in ("conv1", "conv2", "conv3"):
        for _, hist in _values(acc, f"task_2/masks/{layer}"):
            # TF2 histogram tensors: rows of (left edge, right edge, count).
            assert hist.shape[1] == 3 and hist[:, 2].sum() > 0
            assert hist[:, 0].min() >= 0.0 and hist[:, 1].max() <= 1.0


def test_per_task_evaluation_matches_results_json(run):
    _, acc, results, _ = run
    assert _scalars(acc, "eval/A_t") == [(t + 1, pytest.approx(a)) for t, a in enumerate(results["average_accuracy"])]
    assert [v for _, v in _scalars(acc, "eval/task_aware_A_t")] == pytest.approx(results["task_aware_average_accuracy"])
    assert _scalars(acc, "eval/accuracy/task_1")[-1] == (3, pytest.approx(results["accuracy_matrix"][2][0]))
    assert _scalars(acc, "eval/bwt")[-1][1] == pytest.approx(results["bwt"])
    assert _scalars(acc, "eval/forgetting")[-1][1] == pytest.approx(results["average_forgetting"])
    for _, v in _scalars(acc, "eval/A_t"):
        assert 0.0 <= v <= 1.0
    # Replay quality per class, the same numbers as results.json.
    assert _scalars(acc, "replay/00_Trouser")[-1][1] == pytest.approx(results["replay_accuracy"][2][0])
    assert _scalars(acc, "replay/02_Bag") == [(3, pytest.approx(results["replay_accuracy"][2][2]))]
    # Where each task's time went, as results.json records it.
    for phase in ("iterations", "first_step", "validation", "checkpoint", "other"):
        assert _scalars(acc, f"time/{phase}") == [
            (t + 1, pytest.approx(row[phase], abs=1e-4)) for t, row in enumerate(results["time_breakdown_s"])]
    assert [v for _, v in _scalars(acc, "time/wall")] == pytest.approx(results["wall_time_s"], abs=1e-4)
    assert [v for _, v in _scalars(acc, "time/non_step_fraction")] == pytest.approx(
        [(w - row["iterations"]) / w for w, row in zip(results["wall_time_s"], results["time_breakdown_s"])], abs=1e-5)


def test_capacity_numbers_match_the_generator(run):
    _, acc, results, _ = run
    for t, state in enumerate(results["method_state"]):
        for layer, reserved, used in zip(("conv1", "conv2", "conv3"), state["reserved_fraction"],
                                         state["task_mask_fraction"]):
            r = dict(_scalars(acc, f"capacity/{layer}/reserved"))[t + 1]
            f = dict(_scalars(acc, f"capacity/{layer}/free"))[t + 1]
            u = dict(_scalars(acc, f"capacity/{layer}/task_used"))[t + 1]
            assert r == pytest.approx(reserved) and r + f == pytest.approx(1.0) and u == pytest.approx(used)
            assert 0.0 < r <= 1.0 and u <= r + 1e-9
    params = [v for _, v in _scalars(acc, "capacity/generator_params")]
    assert params == results["generator_params"]
    growth = [v for _, v in _scalars(acc, "capacity/growth_params")]
    assert growth == [b - a for a, b in zip(params, params[1:])] and all(g > 0 for g in growth)


def test_images_and_text(run):
    _, acc, _, _ = run
    tags = set(acc.Tags()["tensors"])
    for tag in ("task_1/samples", "task_3/samples", "task_2/real_vs_replay", "eval/accuracy_matrix", "eval/samples"):
        assert tag in tags, tag
    # Image summaries are [width, height, png...] string tensors.
    _, value = _values(acc, "eval/samples")[-1]
    png = tf.io.decode_png(value[2]).numpy()
    assert png.shape[0] == 3 * 34 + 2  # one row per seen class (32 px + 2 padding)
    # Per epoch, the task's own class only (one row). Its row is the one the task-end
    # grid draws for it: same seed, and the generator is not trained after the last epoch.
    epoch_grids = _values(acc, "task_3/samples")
    assert len(epoch_grids) == 2  # validated every epoch here, 2 epochs
    last_epoch = tf.io.decode_png(epoch_grids[-1][1][2]).numpy()
    assert last_epoch.shape == (34 + 2, png.shape[1], png.shape[2])
    np.testing.assert_array_equal(last_epoch[2:34], png[2 + 2 * 34 : 2 + 2 * 34 + 32])
    assert not np.array_equal(last_epoch[2:34], png[2:34])  # not another class's row
    _, matrix = _values(acc, "eval/accuracy_matrix")[-1]
    assert tf.io.decode_png(matrix[2]).shape == (72, 72, 3)
    _, flags = _values(acc, "config/flags")[0]
    assert b"--log_every_steps=1" in flags.item()
    assert "_hparams_/session_start_info" in tags


def test_accuracy_matrix_image_colours_cells_by_accuracy():
    img = accuracy_matrix_image([[1.0, None], [0.0, 0.5]], cell=4)
    assert img.shape == (8, 8, 3)
    assert tuple(img[0, 0]) == (8, 48, 107) and tuple(img[4, 0]) == (255, 255, 255)
    assert tuple(img[0, 4]) == (200, 200, 200) and tuple(img[4, 4]) == (132, 152, 181)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_scalars_and_images(run):
    workdir, _, results, _ = run
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(workdir / "tb"), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline = time.monotonic() + 300  # a failsafe: a loaded machine slows start-up, never a pass
        tags = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/scalars/tags", timeout=5) as r:
                    tags = json.loads(r.read())
                if tags and any("eval/A_t" in t for t in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags, "TensorBoard did not answer"
        (run_name, run_tags), = tags.items()
        assert "eval/A_t" in run_tags and "capacity/conv2/free" in run_tags
        query = urllib.parse.urlencode({"run": run_name, "tag": "eval/A_t"})
        with urllib.request.urlopen(f"{base}/scalars/scalars?{query}", timeout=10) as r:
            points = json.loads(r.read())
        assert [p[1] for p in points] == [1, 2, 3]
        assert [p[2] for p in points] == pytest.approx(results["average_accuracy"])
        with urllib.request.urlopen(f"{base}/images/tags", timeout=10) as r:
            images = json.loads(r.read())
        assert "eval/accuracy_matrix" in images[run_name]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_console_lines_and_verbosity(run, tmp_path):
    _, _, _, proc = run
    assert "task 1/3 epoch 1/2" in proc.stderr and "ETA" in proc.stderr and "summary:" in proc.stderr
    # The console lines come from the engine, whatever the method: the quiet run uses the
    # cheapest one (finetune traces no GAN step: about half this test's time).
    quiet = run_cli(*ARGS, "--class_order=1", "--epochs=1", "--verbosity=-1", "--noexport", "--method=finetune",
                    f"--workdir={tmp_path / 'wd'}")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "epoch 1/1" not in quiet.stderr and "summary:" not in quiet.stderr
