"""NISPA on the engine (dgm_tf/methods/nispa.py): the invariants of a real run (density,
frozen stable connections, no plastic->stable link), the stop rule through the method,
exact resume after a kill mid-phase, the command line for both head variants, and the
flagfiles (CIFAR-10 on mocked TFDS data). The pure pieces: tests/test_nispa_core.py.
Reference: arXiv 2206.09117, github BurakGurbuz97/NISPA.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dgm_tf import engine
from dgm_tf.checkpoint import CheckpointManager
from dgm_tf.config import Config, ConfigError
from dgm_tf.methods import nispa
from dgm_tf.methods import nispa_core as core
from tests.dgm_helpers import assert_same_run, mock_labelled_tfds
from tests.test_cli import REPO, cli_command, parse_flags, run_cli

# Three tasks of two Fashion-MNIST classes (embedded sample), 24 training images per
# class, batches of 16; an MLP of 3 x 32 units at density 0.2; phases of 2 epochs and
# k = 4, so every task runs phases 1-3 (p = 0.85, 0.5, 0.15) and stops after phase 3
# (accuracy) or 4 (p = 0).
TINY = dict(method="nispa", dataset="embedded", class_order=(0, 1, 2, 3, 4, 5), classes_per_task=2,
            train_examples_per_class=24, batch_size=16, nispa_hidden=32, nispa_phase_epochs=2, nispa_k=4,
            eval_every=1, export=False, keep_checkpoints=2)
DENSITY = 0.2  # the MLP's default (nispa_nets.MLP_DENSITY)


_real_validation = nispa.NISPA._validation_pct


def _steered_validation(self, task):
    """The method's real validation accuracy (phases of 2 epochs), steered: phase 1
    keeps its first epoch (the second scores 10 points less), phase 2 its last (the
    first scores 10 less), phase 3 scores 100 points less, so every task stops after
    phase 3 and keeps phase 2's last epoch. A run resumed in phase 1's second epoch then
    needs the kept first epoch's weights from its checkpoint, one resumed in phase 2's
    second epoch the optimizer's slots, and one resumed in phase 3 phase 2's weights
    and stable set (the revert)."""
    st = self._st
    shift = {1: -10.0 * st.epoch_in_phase, 2: -10.0 * (1 - st.epoch_in_phase)}.get(st.phase, -100.0)
    return _real_validation(self, task) + shift


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A real 3-task run (task heads; validation steered, ``_steered_validation``) with
    every phase end and task end recorded."""
    phases, ends = [], []
    end_phase, end_task = nispa.NISPA._end_phase, nispa.NISPA.end_task

    def recording_end_phase(self, task):
        k = self._st.phase
        stopped = end_phase(self, task)
        phases.append(dict(task=task.index, phase=k, stopped=stopped, masks=self.network.masks(),
                           stable=[s.copy() for s in self._st.stable],
                           remainder=None if stopped else self._st.rewires[-1]["remainder"]))
        return stopped

    def recording_end_task(self, task):
        seen = self.scenario.tasks[: task.index + 1]
        before = [self.classifier_logits(t.x_test) for t in seen]
        end_task(self, task)
        ends.append(dict(
            task=task.index, before=before, after=[self.classifier_logits(t.x_test) for t in seen],
            kernels=self.network.kernels(), biases=self.network.biases(), masks=self.network.masks(),
            frozen=[layer.frozen_masks() for layer in self.network.sparse_layers],
        ))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nispa.NISPA, "_end_phase", recording_end_phase)
        mp.setattr(nispa.NISPA, "end_task", recording_end_task)
        mp.setattr(nispa.NISPA, "_validation_pct", _steered_validation)
        workdir = tmp_path_factory.mktemp("nispa") / "wd"
        results = engine.run_experiment(Config(**TINY), workdir)
    return results, phases, ends, workdir


def test_density_stays_exactly_constant_through_every_rewiring_and_task(recorded_run):
    results, phases, ends, _ = recorded_run
    expected = [core.exact_count(DENSITY, m.size) for m in phases[0]["masks"]]
    last_task = 2
    assert [(p["task"], p["phase"], p["stopped"]) for p in phases] == [
        (t, k, k == 3) for t in range(3) for k in (1, 2, 3)]
    assert results["selected_epoch"] == [4, 4, 4]  # phase 2's last epoch
    assert sum(sum(p["remainder"][:-1]) for p in phases if not p["stopped"]) == 0  # hidden layers: always placed
    lost = 0  # connections the logit layer could not regrow: only once every class is stable
    for p in phases:
        if not p["stopped"]:
            assert p["task"] == last_task or p["remainder"][-1] == 0, p["task"]
            lost += p["remainder"][-1] if p["task"] == last_task else 0
        counts = core.connection_counts(p["masks"])
        assert counts[:-1] == expected[:-1], (p["task"], p["phase"])
        if p["task"] < last_task:
            assert counts[-1] == expected[-1]
    # The last task's classes become stable at its first rewiring; the connections from
    # plastic units into them have nowhere to go (nispa.py docstring). The kept masks are
    # those before the rewiring the revert undid.
    assert lost > 0
    final = core.connection_counts(ends[-1]["masks"])
    assert final[:-1] == expected[:-1]
    assert final[-1] == expected[-1] - results["method_state"][-1]["remainder"][-1] < expected[-1]
    for t in (0, 1):
        assert core.connection_counts(ends[t]["masks"]) == expected
        assert results["method_state"][t]["connections"] == expected


def test_no_plastic_unit_feeds_a_stable_one_after_any_phase(recorded_run):
    _, phases, _, _ = recorded_run
    for p in phases:  # after every rewiring, and the reverted state of every stop
        links = core.plastic_to_stable(p["masks"], p["stable"])
        assert not any((link & mask).any() for link, mask in zip(links, p["masks"])), (p["task"], p["phase"])
        assert p["stable"][0].all()  # input units are always stable


def test_frozen_stable_connections_stay_bit_identical_after_later_tasks(recorded_run):
    results, _, ends, _ = recorded_run
    for i, early in enumerate(ends):
        assert sum(int(k.sum()) for k, _ in early["frozen"]) > 0
        # The logit layer's frozen biases are exactly the classes seen so far.
        np.testing.assert_array_equal(early["frozen"][-1][1], np.arange(6) < 2 * (i + 1))
        for late in ends[i + 1:]:
            for l, ((kernel_frozen, bias_frozen), (late_k, late_b)) in enumerate(zip(early["frozen"], late["frozen"])):
                # Frozen stays frozen, its connections stay, their values do not move by a bit.
                assert (late_k[kernel_frozen]).all() and (late_b[bias_frozen]).all()
                np.testing.assert_array_equal(late["kernels"][l][kernel_frozen], early["kernels"][l][kernel_frozen])
                np.testing.assert_array_equal(late["biases"][l][bias_frozen], early["biases"][l][bias_frozen])
                assert (late["masks"][l][kernel_frozen] == early["masks"][l][kernel_frozen]).all()
    # Hence an old task's logits for its own classes are the same, bit for bit, after
    # later tasks, and its task-aware accuracy never changes.
    for t in range(3):
        cols = slice(2 * t, 2 * t + 2)
        for late in ends[t + 1:]:
            np.testing.assert_array_equal(late["after"][t][:, cols], ends[t]["after"][t][:, cols])
    aware = results["task_aware_accuracy_matrix"]
    assert aware[1][0] == aware[2][0] == aware[0][0] and aware[2][1] == aware[1][1]


def test_task_end_reinitialisation_leaves_every_seen_class_logit_unchanged(recorded_run):
    _, _, ends, _ = recorded_run
    for end in ends:  # the engine evaluates before end_task, exports and checkpoints after it
        for before, after in zip(end["before"], end["after"]):
            np.testing.assert_array_equal(before, after)


class _Killed(Exception):
    """Stands for a SIGKILL at a chosen batch (tests/kill_driver.py does the real one)."""


def test_the_stop_rule_reverts_to_the_previous_phase_through_the_method(tmp_path, monkeypatch):
    """Scripted validation (%, per epoch; phases of 2 epochs, a_f 0.75, k 5 so that the
    stable sets shrink visibly and p(4) = 0.095 stays above 5 %): phase 1
    keeps epoch 2 (50), phase 2 epoch 3 (60), phase 3 epoch 5 (59.3 >= 60 - 0.75: go on;
    tied with epoch 6, the earlier is kept), phase 4 epoch 8 (59.2 < 59.25, after phase 2:
    stop). The method must end the task with phase 3's kept epoch: its weights, masks
    and stable set."""
    script = iter([40.0, 50.0, 60.0, 55.0, 59.3, 59.3, 58.0, 59.2])
    config = Config(**dict(TINY, class_order=(0, 1), nispa_k=5.0))
    at_epoch, before_end = {}, {}
    after_epoch, end_task = nispa.NISPA._after_epoch, nispa.NISPA.end_task

    def recording_after_epoch(self, task, epoch, logs):
        at_epoch[epoch] = (self.classifier_weights(), [s.copy() for s in self._st.stable or []])
        after_epoch(self, task, epoch, logs)

    def recording_end_task(self, task):
        before_end.update(weights=self.classifier_weights(), stable=[s.copy() for s in self._st.stable],
                          run=self.task_epochs_run())
        end_task(self, task)

    monkeypatch.setattr(nispa.NISPA, "_validation_pct", lambda self, task: next(script))
    monkeypatch.setattr(nispa.NISPA, "_after_epoch", recording_after_epoch)
    monkeypatch.setattr(nispa.NISPA, "end_task", recording_end_task)
    results = engine.run_experiment(config, tmp_path / "wd")
    assert sorted(at_epoch) == list(range(8)) and next(script, None) is None  # 4 phases ran, no more
    assert before_end["run"] == (8, 4)
    assert results["selected_epoch"] == [5]  # 1-based: phase 3's first epoch
    state = results["method_state"][0]
    assert (state["phases"], state["kept_phase"], state["epochs"], state["kept_epoch"]) == (4, 3, 8, 5)
    assert state["phase_validation_accuracy"] == [50.0, 60.0, 59.3, 59.2]
    kept_weights, kept_stable = at_epoch[4]
    for got, want in zip(before_end["weights"], kept_weights):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(before_end["stable"], kept_stable):
        np.testing.assert_array_equal(got, want)
    # Not a no-op: phase 3's last epoch, and phase 4's weights, masks and stable set differ.
    for other in (5, 7):
        assert any(not np.array_equal(a, b) for a, b in zip(at_epoch[other][0], kept_weights)), other
    phase4_weights, phase4_stable = at_epoch[7]
    assert any(not np.array_equal(a, b) for a, b in zip(phase4_weights[2::3], kept_weights[2::3]))  # masks
    assert any(not np.array_equal(a, b) for a, b in zip(phase4_stable, kept_stable))
    # --restore_best does not replace the method's selection; the engine's validation
    # selection still reports its own best epoch.
    assert results["best_validation_epoch"][0] is not None


keras_callback_batch_begin = nispa.NispaPhaseCallback.on_train_batch_begin


def _kill_at(monkeypatch, point):
    def on_batch(self, batch, logs=None):
        if (self.task.index, self.epoch, batch) == point:
            raise _Killed(point)

    monkeypatch.setattr(nispa.NispaPhaseCallback, "on_train_batch_begin", on_batch, raising=False)


def _final(workdir):
    results = json.loads((workdir / "results.json").read_text())
    for key in ("wall_time_s", "time_breakdown_s"):
        results.pop(key)
    latest = CheckpointManager(workdir / "ckpt").latest()
    assert latest.state["phase"] == "task_end" and latest.state["task"] == 2
    return results, latest


@pytest.mark.parametrize("heads", ["task", pytest.param("single", marks=pytest.mark.slow)])
def test_a_run_killed_mid_phase_resumes_to_the_same_run(heads, recorded_run, tmp_path, monkeypatch):
    """Killed four times in task 2 (validation steered as in the recorded run,
    ``_steered_validation``): inside its second epoch (mid phase 1: the phase's kept
    first epoch, not the weights in place), its fourth (mid phase 2: the optimizer's
    slots), before its fifth (the newest checkpoint is then phase 2's last epoch, before
    that phase's end: the resumed run rewires first) and inside its sixth (mid phase 3,
    which stops: the revert needs phase 2's weights and stable set from the
    checkpoint). Same results.json (times aside) and the same final weights,
    masks, frozen masks and stable sets, bit for bit; the class-incremental variant
    (slow) also the replay buffer and its batches. Task heads compare with the recorded
    run (the same flags; recording changes nothing)."""
    monkeypatch.setattr(nispa.NISPA, "_validation_pct", _steered_validation)
    if heads == "task":
        config, reference = Config(**TINY), recorded_run[3]
    else:
        config, reference = Config(**dict(TINY, nispa_heads="single", replay_buffer=12)), tmp_path / "ref"
        engine.run_experiment(config, reference)
    workdir = tmp_path / "wd"
    kills = (((1, 1, 1), 1, 1), ((1, 3, 1), 3, 1), ((1, 4, 0), 4, 2), ((1, 5, 1), 5, 1))
    for i, (point, done, in_phase) in enumerate(kills):
        _kill_at(monkeypatch, point)
        with pytest.raises(_Killed):
            engine.run_experiment(config, workdir, resume=i > 0)
        latest = CheckpointManager(workdir / "ckpt").latest().state
        assert (latest["phase"], latest["task"], latest["epochs_done"]) == ("epoch", 1, done)
        assert latest["method"]["phase_state"]["epoch_in_phase"] == in_phase
    monkeypatch.setattr(nispa.NispaPhaseCallback, "on_train_batch_begin", keras_callback_batch_begin)
    engine.run_experiment(config, workdir, resume=True)
    (results_a, latest_a), (results_b, latest_b) = _final(reference), _final(workdir)
    assert results_a == results_b
    assert results_b["method_state"][-1]["buffer"] == (12 if heads == "single" else 0)  # 2 of each of 6 classes
    assert sorted(latest_a.arrays) == sorted(latest_b.arrays)
    assert sum(k.startswith("nispa/") for k in latest_a.arrays) > 20
    for key in latest_a.arrays:
        np.testing.assert_array_equal(latest_a.arrays[key], latest_b.arrays[key], err_msg=key)
    assert sorted(latest_a.shared) == sorted(latest_b.shared) and bool(latest_a.shared) == (heads == "single")
    for key, blob in latest_a.shared.items():
        for name, value in blob.items():
            np.testing.assert_array_equal(value, latest_b.shared[key][name])


CLI_TINY = ["--method=nispa", "--dataset=embedded", "--class_order=0,1,2,3", "--classes_per_task=2",
            "--train_examples_per_class=24", "--batch_size=16", "--nispa_hidden=32", "--nispa_phase_epochs=2",
            "--nispa_k=4", "--eval_every=1"]


@pytest.fixture(scope="module", autouse=True)
def _cli_processes(request, tmp_path_factory):
    """Both head variants through ``python -m dgm_tf.main``, started with the module's
    first test when a test reads them (``cli_runs``), so they run beside the in-process
    tests (each spends seconds importing TensorFlow on one core); killed at the end."""
    if not any("cli_runs" in getattr(item, "fixturenames", ()) for item in request.session.items
               if item.module is request.module):
        yield None
        return
    root = tmp_path_factory.mktemp("nispa_cli")
    variants = {"task": [], "single": ["--nispa_heads=single", "--replay_buffer=8", "--noexport"]}
    started = {}
    for name, extra in variants.items():
        argv, env = cli_command(*CLI_TINY, *extra, f"--workdir={root / name}")
        with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
            started[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    yield root, started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cli_runs(_cli_processes):
    root, started = _cli_processes
    runs = {}
    for name, proc in started.items():
        code = proc.wait(timeout=300)
        runs[name] = (root / name, subprocess.CompletedProcess(
            proc.args, code, (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()))
    return runs


@pytest.mark.parametrize("heads", ["task", "single"])
def test_cli_run_writes_class_il_and_task_aware_accuracy(cli_runs, heads):
    workdir, proc = cli_runs[heads]
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["method"] == "nispa" and results["tasks_completed"] == 2
    for key in ("accuracy_matrix", "task_aware_accuracy_matrix", "best_validation_accuracy_matrix",
                "last_epoch_accuracy_matrix"):
        rows = results[key]
        assert rows[0][1] is None and all(0.0 <= a <= 1.0 for row in rows for a in row if a is not None), key
        assert rows[1][0] is not None and rows[1][1] is not None, key
    states = results["method_state"]
    assert [s["heads"] for s in states] == [heads, heads] and all(s["network"] == "mlp" for s in states)
    # The classifier kept is the revert's; the task ran whole phases of 2 epochs.
    assert results["selected_epoch"] == [s["kept_epoch"] for s in states]
    assert all(s["epochs"] == 2 * s["phases"] and 3 <= s["phases"] <= 4 for s in states)
    assert "task 1/2 epoch 1/<=8" in proc.stderr and "stop, keeping phase" in proc.stderr
    assert f"--nispa_heads={heads}" in (workdir / "flags.txt").read_text().splitlines()
    if heads == "task":
        aware = results["task_aware_accuracy_matrix"]
        assert aware[1][0] == aware[0][0]  # frozen: task 1's own head is untouched
        classes = json.loads((workdir / "export" / "classifier" / "2" / "classes.json").read_text())["classes"]
        assert [c["class_id"] for c in classes] == [0, 1, 2, 3]
    else:
        assert [s["buffer"] for s in states] == [8, 8]  # 4 then 2 images of each seen class
        assert not (workdir / "export").exists()
        # The stored images reach TensorBoard although NISPA's last epoch is not known
        # in advance (written at every evaluation epoch).
        from tensorboard.backend.event_processing import event_accumulator as ea

        acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={ea.TENSORS: 0})
        acc.Reload()
        assert "task_2/real_vs_replay" in acc.Tags()["tensors"]


def test_nispa_flags_are_validated_with_one_line_naming_the_flag():
    with pytest.raises(ConfigError, match="^--replay_buffer: applies to --method=dynamos and to --method=nispa --nispa_heads=single"):
        Config(method="nispa", replay_buffer=100)
    with pytest.raises(ConfigError, match="^--replay_buffer: applies"):
        Config(method="mas", replay_buffer=100)
    with pytest.raises(ConfigError, match="^--nispa_heads: unknown heads 'multi'"):
        Config(method="nispa", nispa_heads="multi")
    with pytest.raises(ConfigError, match="^--nispa_network"):
        Config(method="nispa", nispa_network="resnet")
    with pytest.raises(ConfigError, match="^--nispa_k: must be >= 3"):
        Config(method="nispa", nispa_k=2.0)
    with pytest.raises(ConfigError, match="^--nispa_min_phases"):
        Config(method="nispa", nispa_min_phases=1)
    with pytest.raises(ConfigError, match="^--nispa_density"):
        Config(method="nispa", nispa_density=1.5)
    with pytest.raises(ConfigError, match="^--classifier: nispa trains its own"):
        Config(method="nispa", classifier="cnn")
    with pytest.raises(ConfigError, match="^--precision: nispa runs in float32"):
        Config(method="nispa", precision="mixed_bfloat16")
    with pytest.raises(ConfigError, match="^--replay_buffer: 4 images cannot hold one of each"):
        engine.build_scenario(Config(**dict(TINY, nispa_heads="single", replay_buffer=4)))


def test_network_choice_and_phase_budget():
    assert nispa.network_kind(Config(method="nispa"), (32, 32, 1)) == "mlp"
    assert nispa.network_kind(Config(method="nispa"), (32, 32, 3)) == "conv"
    assert nispa.network_kind(Config(method="nispa", nispa_network="conv"), (32, 32, 1)) == "conv"
    # p <= 5 % first at phase 26 for k = 30 (nispa_core), at phase 4 for k = 4.
    assert nispa.max_phases(30.0) == 26 and nispa.max_phases(4.0) == 4 and nispa.max_phases(3.0) == 3


def test_shipped_nispa_flagfiles_parse_with_the_reference_settings():
    fmnist = parse_flags(f"--flagfile={REPO / 'configs' / 'split_fmnist_5x2_nispa.cfg'}", "--workdir=unused")
    # NISPA/EFMNIST_experiment.sh: mlp, prune 80 %, batch 512, lr 0.01, 5-epoch phases, k 30, a_f 0.75.
    assert (fmnist.method, fmnist.dataset, fmnist.classes_per_task, fmnist.num_tasks) == (
        "nispa", "idx:/usr/share/datasets/fashion-mnist", 2, 5)
    assert (fmnist.nispa_network, fmnist.nispa_hidden, fmnist.nispa_density, fmnist.batch_size, fmnist.nispa_lr,
            fmnist.nispa_phase_epochs, fmnist.nispa_k, fmnist.nispa_a_f, fmnist.nispa_heads) == (
        "mlp", 400, 0.2, 512, 0.01, 5, 30.0, 0.75, "task")
    quick = parse_flags(f"--flagfile={REPO / 'configs' / 'quickstart_nispa.cfg'}", "--workdir=unused")
    differ = {k for k, v in quick.as_dict().items() if fmnist.as_dict()[k] != v}
    assert differ == {"dataset", "validation_fraction"} and quick.dataset == "embedded"


def test_cifar10_flagfile_runs_the_convnet_on_mocked_tfds_data(tmp_path):
    config = parse_flags(f"--flagfile={REPO / 'configs' / 'cifar10_nispa.cfg'}", "--workdir=unused")
    # NISPA/CIFAR10_experiment.sh: conv, prune 90 %, batch 128, lr 0.002, 5-epoch phases.
    assert (config.dataset, config.classes_per_task, config.num_tasks, config.nispa_network, config.nispa_hidden,
            config.nispa_density, config.batch_size, config.nispa_lr, config.nispa_phase_epochs) == (
        "tfds:cifar10", 2, 5, "conv", 1024, 0.1, 128, 0.002, 5)
    # A tiny bit of it: two tasks, 16 dense units, phases of one epoch, k = 3 (3 phases).
    tiny = dataclasses.replace(config, data_dir=str(tmp_path), num_tasks=2, nispa_hidden=16,
                               nispa_phase_epochs=1, nispa_k=3.0, batch_size=8, export=False, eval_every=1)
    with mock_labelled_tfds(12, 3):
        results = engine.run_experiment(tiny, tmp_path / "wd")
    assert results["tasks"] == [[0, 1], [2, 3]] and results["tasks_completed"] == 2
    states = results["method_state"]
    assert all(s["network"] == "conv" and s["phases"] == 3 for s in states)
    # conv1 dense (3 x 64 kernels), the rest at density 0.1 per whole kernel; the
    # logit layer over the scenario's 4 classes.
    expected = [3 * 64] + [core.exact_count(0.1, a * b) for a, b in ((64, 64), (64, 128), (128, 128),
                                                                    (128 * 8 * 8, 16))]
    assert states[0]["connections"][:-1] == expected
    assert states[0]["connections"][-1] == core.exact_count(0.1, 16 * 4)
    assert all(0.0 <= a <= 1.0 for a in results["task_aware_accuracy_matrix"][1])


@pytest.mark.slow
def test_sigkilled_mid_phase_and_at_a_phase_end_the_cli_run_resumes_to_the_same_run(tmp_path):
    """SIGKILL (tests/kill_driver.py) inside task 2's fourth epoch and before its third
    (the newest checkpoint then predates phase 1's end), task heads, export on."""
    def killed(point, *args):
        return subprocess.run([sys.executable, str(REPO / "tests" / "kill_driver.py"), point, *args],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    onednn = os.environ["TF_ENABLE_ONEDNN_OPTS"]  # kill_driver inherits it; compared runs share kernels
    reference = tmp_path / "ref"
    proc = run_cli(*CLI_TINY, f"--workdir={reference}", onednn_env=onednn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "wd"
    for i, point in enumerate(("nispa_batch:1:2:0", "nispa_batch:1:3:1")):
        proc = killed(point, *CLI_TINY, f"--workdir={workdir}", *(["--resume"] if i else []))
        assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_cli(*CLI_TINY, f"--workdir={workdir}", "--resume", onednn_env=onednn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task 2, 3 epochs done" in proc.stderr
    assert_same_run(reference, workdir)
    assert sorted(p.name for p in (workdir / "export" / "classifier").iterdir()) == ["1", "2"]
