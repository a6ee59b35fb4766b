"""The command line end to end: run directory contents, flagfiles, and bad input."""

import errno
import json
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dgm_tf import main as cli
from dgm_tf.engine import Stopwatch
from dgm_tf.config import Config, ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--class_order=1,7",
    "--epochs=2",
    "--train_examples_per_class=32",
    "--batch_size=16",
    "--nz=16",
    "--ngf=2",
    "--ndf=4",
    "--samples_per_class=3",
]
# The run tests/conftest.py's `dgm_cli_run` makes once for test_cli, test_monitoring and
# test_resume: TINY with a third task, validation every epoch and TensorBoard every step.
DGM_RUN = [a for a in TINY if not a.startswith("--class_order")] + [
    "--class_order=1,7,8", "--eval_every=1", "--log_every_steps=1",
]


def cli_command(*args, onednn_env=None):
    """The command line and environment of ``python -m dgm_tf.main``: TF_ENABLE_ONEDNN_OPTS
    and TF_CPP_MIN_LOG_LEVEL unset, as a user's shell has them (conftest sets both for this
    process), or oneDNN set to ``onednn_env``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")}
    if onednn_env is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn_env
    return [sys.executable, "-m", "dgm_tf.main", *args], env


def run_cli(*args, timeout=300, onednn_env=None):
    """``python -m dgm_tf.main`` as ``cli_command`` says, run to its end."""
    argv, env = cli_command(*args, onednn_env=onednn_env)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def cli_cases_two_at_a_time(request, tmp_path_factory, test_name, command):
    """Starts the CLI processes of every selected case of the parametrized ``test_name``
    (this module) at once, two at a time, and returns {case id: (root, extra, future of
    the CompletedProcess)}; ``command(root, **params)`` writes the case's inputs under its
    own ``root`` and returns its arguments and anything the case needs later. Each of
    these processes spends ~3 s importing TensorFlow on one core before it fails, so on
    2 cores the cases take half the wall time; each case still asserts on its own process."""
    items = [item for item in request.session.items
             if getattr(item, "originalname", None) == test_name and item.module is request.module]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    request.addfinalizer(lambda: pool.shutdown(wait=True))
    runs = {}
    for item in items:
        root = tmp_path_factory.mktemp("case")
        args, extra = command(root, **item.callspec.params)
        runs[item.callspec.id] = (root, extra, pool.submit(run_cli, *args))
    return runs


def case_result(runs, request):
    """This case's root, extra and finished process (see ``cli_cases_two_at_a_time``)."""
    root, extra, future = runs[request.node.callspec.id]
    return root, extra, future.result()


def parse_flags(*args) -> Config:
    """The Config that main would build from these arguments."""
    try:
        cli.FLAGS(["dgm_tf.main", *args])
        return cli.config_from_flags(["dgm_tf.main", *args])
    finally:
        cli.FLAGS.unparse_flags()


@pytest.fixture
def tiny_run(dgm_cli_run):
    """The shared DGM_RUN (tests/conftest.py): its workdir and finished process."""
    return dgm_cli_run


def test_run_writes_results_with_documented_keys(tiny_run):
    workdir, _ = tiny_run
    results = json.loads((workdir / "results.json").read_text())
    for key in (
        "method", "dataset", "tasks", "accuracy_matrix", "average_accuracy",
        "task_aware_accuracy_matrix", "forgetting", "bwt", "generator_params", "wall_time_s",
    ):
        assert key in results, key
    assert results["method"] == "dgmw"
    assert results["tasks"] == [[1], [7], [8]]
    R = results["accuracy_matrix"]
    assert len(R) == 3 and R[0][1] is None and R[0][2] is None and R[1][2] is None
    assert all(0.0 <= R[i][j] <= 1.0 for i in range(3) for j in range(i + 1))
    assert results["average_accuracy"] == pytest.approx(
        [R[0][0], (R[1][0] + R[1][1]) / 2, (R[2][0] + R[2][1] + R[2][2]) / 3]
    )
    assert results["bwt"] == pytest.approx((R[2][0] - R[0][0] + R[2][1] - R[1][1]) / 2)
    # One class per task: task-aware accuracy is trivially perfect.
    assert results["task_aware_accuracy_matrix"] == [[1.0, None, None], [1.0, 1.0, None], [1.0, 1.0, 1.0]]
    p0, p1, p2 = results["generator_params"]
    assert p2 >= p1 >= p0 > 0
    assert len(results["wall_time_s"]) == 3 and all(w > 0 for w in results["wall_time_s"])
    # Where each task's wall time went: the phases and "other" add up to it.
    for wall, phases in zip(results["wall_time_s"], results["time_breakdown_s"]):
        assert sorted(phases) == sorted(Stopwatch.PHASES + ("other",))
        assert sum(phases.values()) == pytest.approx(wall, abs=0.01)
        # No phase is counted twice ("other" >= 0), and the phases claim most of it.
        assert min(phases.values()) >= -0.01 and phases["other"] < 0.2 * wall
        # The first step traces the task's graph; DGM_RUN trains 2 epochs of 2 steps.
        assert phases["first_step"] > phases["iterations"] / 3 > 0
        for name in ("begin_task", "validation", "monitoring", "checkpoint", "evaluation", "export"):
            assert phases[name] > 0, name
    # main turns TensorFlow's oneDNN kernels on when the user has not chosen (README).
    assert results["runtime"] == {"tensorflow": tf.__version__, "keras": keras.__version__, "onednn": True,
                                  "replicas": 1}


def test_run_exports_every_task_in_tf_serving_layout(tiny_run):
    workdir, _ = tiny_run
    for model in ("classifier", "generator"):
        assert sorted(p.name for p in (workdir / "export" / model).iterdir()) == ["1", "2", "3"]
        for version, learned in ((2, [1, 7]), (3, [1, 7, 8])):
            classes = json.loads((workdir / "export" / model / str(version) / "classes.json").read_text())["classes"]
            assert [c["class_id"] for c in classes] == learned
    assert 'name: "classifier"' in (workdir / "export" / "models.config").read_text()


def test_noexport_writes_no_export_folder(tmp_path):
    workdir = tmp_path / "wd"
    # The engine skips the export for every method; fine-tuning would export a classifier
    # and traces no GAN step (the cheapest run).
    proc = run_cli(*TINY, "--epochs=1", "--class_order=1", "--noexport", "--method=finetune", f"--workdir={workdir}",
                   "--verbosity=1", onednn_env="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (workdir / "results.json").exists() and not (workdir / "export").exists()
    # --verbosity=1 brings back absl's full prefix and TensorFlow's own records.
    sources = set(LOG_RECORD.findall(proc.stderr))
    engine_files = {p.name for p in (REPO / "dgm_tf" / "engine").glob("*.py")}  # the task loop's own lines
    assert "loop.py" in sources and sources - engine_files - {"main.py"}, sources
    # A user's TF_ENABLE_ONEDNN_OPTS=0 is kept, and the run records it.
    assert json.loads((workdir / "results.json").read_text())["runtime"]["onednn"] is False


def test_run_writes_sample_grids_of_every_seen_class(tiny_run):
    workdir, _ = tiny_run
    for task, rows in ((1, 1), (2, 2), (3, 3)):
        png = tf.io.decode_png(tf.io.read_file(str(workdir / "samples" / f"task_{task:02d}.png"))).numpy()
        # rows of classes x 3 samples of 32x32 with 2-pixel padding
        assert png.shape == (rows * 34 + 2, 3 * 34 + 2, 1)
        assert np.std(png) > 10


# A log record in absl's or TensorFlow's C++ format: "I1201 00:52:26.789895 5217 port.cc:153] ...".
LOG_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ (\S+):\d+\] ", re.MULTILINE)


def test_run_prints_epoch_progress_and_summary(tiny_run):
    _, proc = tiny_run
    log = proc.stderr + proc.stdout
    assert "task 3/3 epoch 2/2" in log
    assert "A_3=" in log and "summary" in log
    # Only the project's own lines, each "HH:MM:SS message": none of TensorFlow's start-up
    # records, its cuInit ERROR on GPU-less machines, or the SavedModel writer's INFO lines.
    assert not LOG_RECORD.findall(log), log[:3000]
    for noise in ("cuInit", "absl::InitializeLog", "signature_serialization", "fingerprint.pb", "Sharding callback"):
        assert noise not in log, noise
    assert re.search(r"^\d\d:\d\d:\d\d task 3/3 epoch 2/2 ", log, re.MULTILINE), log[:3000]


def test_startup_filter_keeps_warnings_and_errors_and_drops_info():
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796086344.106851    5217 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796086344.179774    5217 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild.\n"
        "E0000 00:00:1796086345.663140    5217 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n"
        "W0000 00:00:1796086345.700000    5217 gpu_device.cc:2341] Cannot dlopen some GPU libraries.\n"
        "Skipping registering GPU devices...\n"
        "E0000 00:00:1796086345.800000    5217 some_op.cc:10] a real error\n"
        "a plain line\n"
    )
    from dgm_tf.runtime import filter_startup_log

    assert filter_startup_log(text) == (
        "W0000 00:00:1796086345.700000    5217 gpu_device.cc:2341] Cannot dlopen some GPU libraries.\n"
        "Skipping registering GPU devices...\n"
        "E0000 00:00:1796086345.800000    5217 some_op.cc:10] a real error\n"
        "a plain line\n"
    )


def test_lr_and_the_per_network_rates_the_later_flag_wins():
    # configs/quickstart.cfg sets --lr; a --lr_d typed after the flagfile must count.
    cfg = parse_flags("--flagfile=configs/quickstart.cfg", "--lr_d=0.0005")
    assert cfg.lr_d == 0.0005
    cfg = parse_flags("--lr=0.003", "--lr_d=0.0005")
    assert (cfg.lr_d, cfg.lr_g) == (0.0005, 0.003)
    cfg = parse_flags("--lr_g=0.0005", "--lr=0.003")
    assert cfg.lr_d == cfg.lr_g == 0.003
    cfg = parse_flags("--lr=0.003", "--lr_g=0.0005")
    assert (cfg.lr_d, cfg.lr_g) == (0.003, 0.0005)
    cfg = parse_flags("--flagfile=configs/quickstart.cfg", "--lr=0.001")
    assert cfg.lr_d == cfg.lr_g == 0.001


def test_flags_txt_reproduces_the_config(tiny_run, tmp_path):
    workdir, _ = tiny_run
    reproduced = parse_flags(f"--flagfile={workdir / 'flags.txt'}", f"--workdir={tmp_path}")
    expected = parse_flags(*DGM_RUN, f"--workdir={tmp_path}")
    assert reproduced == expected


@pytest.fixture(scope="module")
def bad_input_runs(request, tmp_path_factory):
    return cli_cases_two_at_a_time(request, tmp_path_factory, "test_bad_input_gets_one_clear_line_and_writes_nothing",
                                   lambda root, args, flag: ([*args, f"--workdir={root / 'wd'}"], None))


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--epochs=0"], "--epochs"),
        (["--batch_size=0"], "--batch_size"),
        (["--smax=0"], "--smax"),
        (["--method=nope"], "--method"),
        (["--class_order=1,1"], "--class_order"),
        (["--class_order=1,x"], "--class_order"),
        (["--class_order=1,2,3", "--classes_per_task=2"], "--classes_per_task"),
        (["--class_order=1,42"], "--class_order"),
        (["--num_tasks=11"], "--num_tasks"),
        (["--nz=8"], "--nz"),
        (["--precision=fp8"], "--precision"),
        (["--classifier=cnn"], "--classifier"),  # DGM classifies with its discriminator
        (["--method=mas", "--mas_lambda=inf"], "--mas_lambda"),
        (["--lr=nan"], "--lr_d"),
        (["--dataset=idx:/nonexistent/dir"], "/nonexistent/dir"),
        (["--dataset=bogus"], "bogus"),
    ],
)
def test_bad_input_gets_one_clear_line_and_writes_nothing(bad_input_runs, request, args, flag):
    root, _, proc = case_result(bad_input_runs, request)
    workdir = root / "wd"
    assert proc.args[-1] == f"--workdir={workdir}" and proc.args[-1 - len(args):-1] == args  # this case's run
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and flag in error_lines[0], proc.stderr[-2000:]
    assert not workdir.exists()


def test_missing_workdir_is_an_error():
    proc = run_cli("--epochs=1")
    assert proc.returncode == 2 and "--workdir" in proc.stderr


def test_non_empty_workdir_is_refused_and_left_alone(tmp_path):
    (tmp_path / "results.json").write_text("precious")
    proc = run_cli(*TINY, f"--workdir={tmp_path}")
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "results.json").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_config_is_frozen_and_validated():
    config = Config()
    with pytest.raises(Exception):
        config.epochs = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="--lambda_gp"):
        Config(lambda_gp=-1.0)


def test_shipped_flagfiles_parse(tmp_path):
    quick = parse_flags(f"--flagfile={REPO / 'configs' / 'quickstart.cfg'}", f"--workdir={tmp_path}")
    assert quick.method == "dgmw" and quick.dataset == "embedded" and quick.classes_per_task == 1
    ref = parse_flags(f"--flagfile={REPO / 'configs' / 'mnist_dgmw.cfg'}", f"--workdir={tmp_path}")
    # The reference's MNIST DGMw row (SAP/machine-learning-dgm cfg/cfg_mnist_dgmw.yml).
    assert (ref.ngf, ref.ndf, ref.epochs, ref.batch_size, ref.seed) == (6, 32, 101, 64, 0)
    assert (ref.lr_d, ref.lr_g, ref.smax, ref.lambda_mask, ref.lambda_gp) == (0.002, 0.002, 1e4, 0.08, 1.0)
    assert ref.nz == 128 and ref.reinit_d and not ref.aux_g and ref.beta1 == 0.5
    # Later flags override the flagfile, as the README's commands rely on.
    over = parse_flags(
        f"--flagfile={REPO / 'configs' / 'mnist_dgmw.cfg'}", "--epochs=5", f"--workdir={tmp_path}"
    )
    assert over.epochs == 5
    # The reference's MNIST DGMa row (cfg/cfg_mnist_dgma.yml).
    dgma = parse_flags(f"--flagfile={REPO / 'configs' / 'mnist_dgma.cfg'}", f"--workdir={tmp_path}")
    assert dgma.method == "dgma"
    assert (dgma.ngf, dgma.ndf, dgma.epochs, dgma.batch_size, dgma.seed) == (20, 32, 101, 64, 0)
    assert (dgma.lr_d, dgma.lr_g, dgma.smax, dgma.lambda_mask, dgma.lambda_gp) == (0.002, 0.002, 1e5, 0.01, 1.0)
    # The DGMa quickstart differs from the DGMw one only in the generator settings.
    quick_a = parse_flags(f"--flagfile={REPO / 'configs' / 'quickstart_dgma.cfg'}", f"--workdir={tmp_path}")
    differ = {k for k, v in quick_a.as_dict().items() if quick.as_dict()[k] != v}
    assert differ == {"method", "ngf", "smax", "lambda_mask"}
    svhn = parse_flags(f"--flagfile={REPO / 'configs' / 'svhn_dgma.cfg'}", f"--workdir={tmp_path}")
    assert (svhn.method, svhn.dataset, svhn.epochs, svhn.seed) == ("dgma", "tfds:svhn_cropped", 151, 100)


def test_method_registry_matches_the_names_config_accepts():
    from dgm_tf.config import METHODS as names
    from dgm_tf.methods import METHODS as registry

    assert set(names) == set(registry)


def _write_png(path, height, width, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(np.full((height, width, channels), 128, np.uint8)).numpy())


def _bad_npz_without_y(root):
    np.savez(root / "data.npz", x=np.zeros((4, 8, 8), np.uint8))
    return "npz:" + str(root / "data.npz"), [str(root / "data.npz"), "y"]


def _bad_npz_labels(root):
    np.savez(root / "data.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 5]),
             class_names=np.array(["a", "b", "c"]))
    return "npz:" + str(root / "data.npz"), [str(root / "data.npz"), "5"]


def _bad_folder_sizes(root):
    for i in range(3):
        _write_png(root / "imgs" / "cat" / f"{i}.png", 8, 8)
    _write_png(root / "imgs" / "dog" / "0.png", 8, 8)
    _write_png(root / "imgs" / "dog" / "1.png", 9, 8)
    return "folder:" + str(root / "imgs"), [str(root / "imgs" / "dog" / "1.png")]


def _bad_folder_empty_class(root):
    for i in range(3):
        _write_png(root / "imgs" / "cat" / f"{i}.png", 8, 8)
    (root / "imgs" / "dog").mkdir()
    return "folder:" + str(root / "imgs"), [str(root / "imgs" / "dog")]


def _bad_idx_magic(root):
    d = root / "idx"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (d / name).write_bytes(b"\x12\x34\x56\x78" + bytes(16))
    return "idx:" + str(d), [str(d / "train-images-idx3-ubyte"), "magic"]


def _bad_data_command(root, make):
    spec, needles = make(root)
    return [f"--dataset={spec}", f"--workdir={root / 'wd'}"], needles


@pytest.fixture(scope="module")
def bad_data_runs(request, tmp_path_factory):
    return cli_cases_two_at_a_time(request, tmp_path_factory, "test_bad_data_files_get_one_line_naming_the_file",
                                   _bad_data_command)


@pytest.mark.parametrize(
    "make", [_bad_npz_without_y, _bad_npz_labels, _bad_folder_sizes, _bad_folder_empty_class, _bad_idx_magic]
)
def test_bad_data_files_get_one_line_naming_the_file(bad_data_runs, request, make):
    root, needles, proc = case_result(bad_data_runs, request)
    workdir = root / "wd"
    assert proc.args[-1] == f"--workdir={workdir}" and proc.args[-2].startswith("--dataset=")  # this case's run
    assert str(root) in proc.args[-2] and make.__name__ in request.node.callspec.id
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]
    assert not workdir.exists()


def test_a_tiny_run_on_a_folder_dataset_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("circle", "square")):
        for i in range(10):
            img = np.clip(rng.normal(60 + 120 * c, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            (tmp_path / "imgs" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "imgs" / name / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    workdir = tmp_path / "wd"
    # Both classes in one task: the data path, the RGB networks and the export are the
    # same for one task as for two, and a second task would only add its tracing.
    proc = run_cli(f"--dataset=folder:{tmp_path / 'imgs'}", "--class_order=random:1", "--classes_per_task=2",
                   "--epochs=1", "--batch_size=4", "--nz=16", "--ngf=2", "--ndf=4", "--samples_per_class=2",
                   f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert sorted(c for task in results["tasks"] for c in task) == [0, 1]
    assert (workdir / "export" / "classifier" / "1" / "saved_model.pb").is_file()
    assert "--class_order=random:1" in (workdir / "flags.txt").read_text().splitlines()
    # RGB end to end: 3-channel generator heads, discriminator input and sample grid.
    grid = tf.io.decode_png((workdir / "samples" / "task_01.png").read_bytes()).numpy()
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3) and grid.std() > 0  # a row per class


def test_unwritable_workdir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_cli(*TINY, f"--workdir={blocker / 'wd'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "--workdir" in error[0] and "not writable" in error[0]
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("code, remedy", [
    (errno.ENOSPC, "once there is room"),
    (errno.EACCES, "make the work directory writable"),
    (errno.EROFS, "make the work directory writable"),
    (errno.EIO, "fix the cause"),
])
def test_write_error_names_the_file_and_the_remedy_for_its_cause(code, remedy):
    message = cli.write_error_message(OSError(code, os.strerror(code), "/w/results.json"))
    assert message.startswith("cannot write (/w/results.json): " + os.strerror(code))
    assert remedy in message and "files written before stay intact" in message
    if code != errno.ENOSPC:
        assert "room" not in message
