"""Exact resume after SIGKILL, refusals, non-finite losses and a full disk.

A run is killed at chosen points by tests/kill_driver.py (which patches one function
and SIGKILLs its own process there), resumed with ``--resume``, and compared with an
uninterrupted run: same results.json (wall times aside) and the same final weights,
bit for bit.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dgm_tf.checkpoint import CheckpointManager
from tests.test_cli import DGM_RUN, REPO, run_cli

# Three one-class tasks of 2 epochs (2 iterations each): the shared CLI run of
# tests/conftest.py, so the uninterrupted reference costs nothing here.
FLAGS = DGM_RUN
FLAGS_4 = [f for f in FLAGS if not f.startswith("--class_order")] + ["--class_order=1,7,8,9"]


def run_killed(point, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "kill_driver.py"), point, *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def run_cli_as_killed(*args):
    """``run_cli`` on the kernels ``run_killed``'s runs use: they inherit this process's
    TF_ENABLE_ONEDNN_OPTS (kill_driver loads TensorFlow before main could choose), and
    runs compared bit for bit must share them, also under TF_ENABLE_ONEDNN_OPTS=0."""
    return run_cli(*args, onednn_env=os.environ["TF_ENABLE_ONEDNN_OPTS"])


def _final_state(workdir):
    results = json.loads((workdir / "results.json").read_text())
    for wall, phases in zip(results.pop("wall_time_s"), results.pop("time_breakdown_s")):
        # A resumed task's phases carry on from its checkpoint: none is lost or doubled.
        assert sum(phases.values()) == pytest.approx(wall, abs=0.01)
        assert min(phases.values()) >= -0.01 and phases["other"] < 0.2 * wall
        assert phases["first_step"] > 0 and phases["iterations"] > 0
    latest = CheckpointManager(workdir / "ckpt").latest()
    assert latest.state["phase"] == "task_end"
    return results, latest.arrays


def assert_same_run(reference, resumed):
    results_a, arrays_a = _final_state(reference)
    results_b, arrays_b = _final_state(resumed)
    assert results_a == results_b
    assert sorted(arrays_a) == sorted(arrays_b)
    weights = [k for k in arrays_a if k.startswith(("generator/", "discriminator/", "reserved/"))]
    assert len(weights) > 30
    for key in weights:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    for model in ("classifier", "generator"):
        assert sorted(p.name for p in (resumed / "export" / model).iterdir()) == sorted(
            p.name for p in (reference / "export" / model).iterdir()
        )


@pytest.fixture(scope="module")
def reference(dgm_cli_run, tmp_path_factory):
    """The uninterrupted run (read only). Compared bit for bit, it must run on the
    kernels run_killed's runs inherit from this process: the shared run leaves oneDNN to
    main, which turns it on, as conftest did here unless TF_ENABLE_ONEDNN_OPTS said
    otherwise; then the reference runs on this process's setting."""
    if os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1":
        return dgm_cli_run[0]
    workdir = tmp_path_factory.mktemp("ref") / "wd"
    proc = run_cli_as_killed(*FLAGS, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture
def finished(reference, tmp_path):
    """A copy of the finished reference run, for tests that resume it."""
    return shutil.copytree(reference, tmp_path / "finished")


def test_killed_writing_a_checkpoint_mid_task_and_during_export_resumes_to_the_same_run(reference, tmp_path):
    workdir = tmp_path / "wd"
    # Checkpoints follow every epoch and every task: task 1 writes 1, 2 and 3 (its end),
    # task 2 writes 4 and 5 after its epochs. Killed while the 5th is written but not
    # renamed in: the 4th is the newest whole one (keep=3), the half-written one is never
    # read, and the work of task 2's second epoch is lost.
    proc = run_killed("checkpoint:5", *FLAGS, f"--workdir={workdir}")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in CheckpointManager(workdir / "ckpt").paths()] == ["000002", "000003", "000004"]
    assert any(p.name.startswith(".tmp") for p in (workdir / "ckpt").iterdir())
    # The checkpoint is written beside training (dgm_tf/engine/writer.py), which may have
    # finished task 2 and its results.json before the kill: the resume goes by the
    # checkpoints, and rewrites results.json.
    assert json.loads((workdir / "results.json").read_text())["tasks_completed"] in (1, 2)
    # Resumed mid-task in task 2 (grown generator, replay set from ckpt/shared, optimizer
    # slots), then killed while export version 2 is written but not renamed in. (A kill
    # inside an epoch and one as a task begins: the -m slow 4-task test below.)
    proc = run_killed("export:2", *FLAGS, f"--workdir={workdir}", "--resume")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "resuming from" in proc.stderr and "task 2, 1 epochs done" in proc.stderr
    # The half-written version 2 is invisible to a server (no numeric name).
    names = sorted(p.name for p in (workdir / "export" / "classifier").iterdir())
    assert [n for n in names if n.isdigit()] == ["1"] and any(n.startswith(".tmp-2-") for n in names)
    proc = run_cli_as_killed(*FLAGS, f"--workdir={workdir}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Version 2 is written while task 3 begins (dgm_tf/engine/writer.py): the kill may
    # come before task 2's end checkpoint (resumed from its last epoch's) or after it
    # (resumed from the task's end, writing the missing version again).
    assert ("task 2, 2 epochs done" in proc.stderr) != ("task 2, finished" in proc.stderr)
    assert ("task 2, finished" in proc.stderr) == ("export version 2 of classifier and generator is missing" in proc.stderr)
    assert_same_run(reference, workdir)
    assert not any(p.name.startswith(".tmp") for p in (workdir / "export" / "classifier").iterdir())


@pytest.mark.slow
def test_four_tasks_killed_at_every_kind_of_point_resume_to_the_same_run(tmp_path):
    reference = tmp_path / "ref"
    proc = run_cli_as_killed(*FLAGS_4, f"--workdir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "wd"
    points = ["batch:0:1:0", "begin_task:2", "checkpoint:2", "export:3", "batch:3:0:1"]
    for i, point in enumerate(points):
        proc = run_killed(point, *FLAGS_4, f"--workdir={workdir}", *(["--resume"] if i else []))
        assert proc.returncode == -9, (point, proc.stderr[-2000:])
        for ckpt in (p for p in (workdir / "ckpt").iterdir() if p.name.isdigit()):  # none half-written
            assert (ckpt / "state.json").is_file() and (ckpt / "arrays.npz").is_file(), (point, ckpt)
    proc = run_cli_as_killed(*FLAGS_4, f"--workdir={workdir}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, workdir)


def test_resuming_a_finished_run_changes_nothing_and_may_change_logging_cadence(finished):
    # One process for two properties: a resume may change the logging cadence (a
    # RESUME_MAY_CHANGE flag: 1 in the run, 7 now), and a finished run stays as it was.
    # (A resume with the run's own flags: the kill test above.)
    before = (finished / "results.json").read_text()
    proc = run_cli(*FLAGS, "--log_every_steps=7", f"--workdir={finished}", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (finished / "results.json").read_text() == before
    assert "task 3, finished" in proc.stderr
    assert "is missing" not in proc.stderr  # every version in place: no export written again


def test_resume_writes_again_an_export_the_run_stopped_before_finishing(finished, tmp_path):
    # A task's export is written while the next task trains (dgm_tf/engine/writer.py),
    # so a run can stop after the task-end checkpoint but before its version is renamed
    # in. Here version 3 of both models is missing from a finished run: resuming writes
    # it again from the restored networks, and it serves what the original served.
    originals = tmp_path / "originals"
    originals.mkdir()
    for model in ("classifier", "generator"):
        shutil.move(finished / "export" / model / "3", originals / model)
    proc = run_cli(*FLAGS, f"--workdir={finished}", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "export version 3 of classifier and generator is missing" in proc.stderr
    import tensorflow as tf

    images = tf.constant(np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8))
    old = tf.saved_model.load(str(originals / "classifier")).signatures["serving_default"](images=images)
    new = tf.saved_model.load(str(finished / "export" / "classifier" / "3")).signatures["serving_default"](images=images)
    np.testing.assert_array_equal(old["probabilities"].numpy(), new["probabilities"].numpy())
    request = dict(class_ids=tf.constant([1, 7, 8], tf.int64), seed=tf.constant([0, 1, 2], tf.int64))
    old = tf.saved_model.load(str(originals / "generator")).signatures["serving_default"](**request)
    new = tf.saved_model.load(str(finished / "export" / "generator" / "3")).signatures["serving_default"](**request)
    np.testing.assert_array_equal(old["images"].numpy(), new["images"].numpy())


def test_resume_with_other_flags_is_refused_with_the_differences(finished):
    listing = sorted(p.name for p in (finished / "ckpt").iterdir())
    proc = run_cli(*FLAGS, "--epochs=3", "--lr=0.001", f"--workdir={finished}", "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1
    assert "--epochs: run has 2, now 3" in error[0] and "--lr_d: run has 0.002, now 0.001" in error[0]
    assert sorted(p.name for p in (finished / "ckpt").iterdir()) == listing


@pytest.mark.parametrize("setup", ["missing", "no_flags"])
def test_resume_without_a_run_is_an_error(tmp_path, setup):
    workdir = tmp_path / "wd"
    if setup == "no_flags":
        workdir.mkdir()
        (workdir / "notes.txt").write_text("mine")
    proc = run_cli(*FLAGS, f"--workdir={workdir}", "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nothing to resume" in proc.stderr or "no flags.txt" in proc.stderr
    if setup == "no_flags":
        assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def test_full_disk_stops_with_one_line_and_keeps_earlier_results(tmp_path):
    # The engine writes results.json for every method; fine-tuning is the cheapest run
    # that reaches the second write (no GAN step to trace: about half DGMw's time).
    workdir = tmp_path / "wd"
    proc = run_killed("enospc:results.json:2", *FLAGS, "--method=finetune", f"--workdir={workdir}")
    assert proc.returncode == 4, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "results.json" in error[0] and "No space left on device" in error[0]
    assert "Traceback" not in proc.stderr
    results = json.loads((workdir / "results.json").read_text())  # still the task-1 file, whole
    assert results["tasks_completed"] == 1
    assert not [p for p in workdir.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temporary files left


def test_non_finite_loss_stops_naming_task_epoch_and_step(tmp_path, monkeypatch):
    from dgm_tf import engine
    from dgm_tf.config import Config

    original = engine.NonFiniteGuard.on_train_batch_end

    def poisoned(self, batch, logs=None):
        if self.task == 1 and self.epoch == 1 and batch == 1:
            assert np.isfinite(logs["c_loss_step"])  # the step's own loss, as the method logged it
            logs = dict(logs, c_loss_step=np.float32("nan"))
        return original(self, batch, logs)

    monkeypatch.setattr(engine.NonFiniteGuard, "on_train_batch_end", poisoned)
    # The guard and the checkpoints are the engine's, whatever the method: fine-tuning
    # (c_loss_step) is the cheapest to reach task 2 (no GAN step to trace).
    config = Config(method="finetune", dataset="embedded", class_order=(1, 7, 8), epochs=2,
                    train_examples_per_class=32, batch_size=16, nz=16, ndf=4, export=False)
    with pytest.raises(engine.TrainingError, match=r"non-finite c_loss .* task 2, epoch 2, step 2"):
        engine.run_experiment(config, tmp_path / "wd")
    latest = CheckpointManager(tmp_path / "wd" / "ckpt").latest()
    assert (latest.state["task"], latest.state["epochs_done"], latest.state["phase"]) == (1, 1, "epoch")


@pytest.mark.parametrize(
    "flagfile_text, needle",
    [("--epochs=abc\n", "--epochs=abc"), ("--no_such_flag=1\n", "no_such_flag")],
)
def test_malformed_flagfile_is_one_clear_line(tmp_path, flagfile_text, needle):
    path = tmp_path / "bad.cfg"
    path.write_text(flagfile_text)
    proc = run_cli(f"--flagfile={path}", f"--workdir={tmp_path / 'wd'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr and not (tmp_path / "wd").exists()


def test_missing_flagfile_is_one_clear_line(tmp_path):
    proc = run_cli(f"--flagfile={tmp_path / 'none.cfg'}", f"--workdir={tmp_path / 'wd'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "none.cfg" in proc.stderr


def test_checkpoint_write_is_atomic_and_pruned(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for i in range(4):
        manager.save({"i": i}, {"w": np.full(3, i)}, shared={f"blob_{i // 2}": {"x": np.arange(i)}})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000003", "000004", "shared"]
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["blob_1.npz"]
    latest = manager.latest()
    assert latest.state["i"] == 3 and latest.arrays["w"].tolist() == [3, 3, 3]
    # A damaged newest checkpoint falls back to the previous one.
    (tmp_path / "000004" / "arrays.npz").write_bytes(b"garbage")
    assert manager.latest().state["i"] == 2


def test_flags_text_round_trips_every_config_field():
    from dgm_tf.config import Config

    config = Config(class_order="random:4", aux_g=True, lr_d=0.0005, channels=3, data_dir="/x y", precision="mixed_bfloat16")
    assert Config.from_flags_text("# comment\n" + "\n".join(config.to_flags())) == config
    explicit = Config(class_order=(3, 1, 2))
    assert Config.from_flags_text("\n".join(explicit.to_flags())) == explicit


# Three CLI runs: slow-marked when the default run reached 9.6 min with oneDNN on
# (8.5 min before; not profiled further). DGMa's own pieces stay in the default
# run (tests/test_dgm.py, both mask kinds); `make test-slow` runs this.
@pytest.mark.slow
def test_dgma_runs_end_to_end_and_resumes_to_the_same_run(tmp_path):
    """DGMa shares the engine, checkpoints and export with DGMw: a 2-task run killed
    mid-task resumes to the uninterrupted run, and its generator export serves."""
    flags = [f for f in FLAGS if not f.startswith("--class_order")] + ["--class_order=1,7", "--method=dgma"]
    reference = tmp_path / "ref"
    proc = run_cli_as_killed(*flags, f"--workdir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((reference / "results.json").read_text())
    assert results["method"] == "dgma"
    state = results["method_state"][0]
    # Growth adds the channels task 1 newly reserved (approaches/DGMa.py extand_layers).
    assert state["growth_channels"] == state["newly_reserved"]
    assert results["method_state"][1]["generator_widths"] == [
        w + g for w, g in zip(state["generator_widths"], state["growth_channels"])
    ]
    workdir = tmp_path / "wd"
    # Killed while writing task 1's first epoch checkpoint (the 4th: two epochs and the
    # end of task 0 before it), so the resume rebuilds DGMa at a task boundary: channel
    # growth planned by task 0, reserved channel masks padded. (Mid-task resume is the
    # same code for both mask kinds; the DGMw test above kills mid-epoch.)
    proc = run_killed("checkpoint:4", *flags, f"--workdir={workdir}")
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_cli_as_killed(*flags, f"--workdir={workdir}", "--resume")
    assert "task 1, finished" in proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, workdir)
    import tensorflow as tf

    served = tf.saved_model.load(str(reference / "export" / "generator" / "2")).signatures["serving_default"]
    out = served(class_ids=tf.constant([1, 7, 7], tf.int64), seed=tf.constant([0, 1, 2], tf.int64))
    images = next(iter(out.values())).numpy()
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8 and images.std() > 0
