"""Shared fixtures: small real scenarios from the embedded Fashion-MNIST sample."""

import os
import pathlib
import shutil
import subprocess
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dgm_tf import runtime  # noqa: E402

# The suite runs TensorFlow as `python -m dgm_tf.main` does (oneDNN kernels unless
# TF_ENABLE_ONEDNN_OPTS says otherwise); subprocesses inherit the setting.
runtime.prefer_onednn()

import keras  # noqa: E402
import pytest  # noqa: E402

from dgm_tf.data import load_dataset, make_scenario  # noqa: E402


@pytest.fixture(scope="session")
def embedded_raw():
    return load_dataset("embedded")


@pytest.fixture
def tiny_scenario(embedded_raw):
    """Three one-class tasks (trouser, sneaker, bag), 64 training images each."""
    keras.utils.set_random_seed(0)
    return make_scenario(
        embedded_raw, class_order=(1, 7, 8), classes_per_task=1, num_tasks=None,
        train_examples_per_class=64, validation_fraction=0.15, seed=0,
    )


class BackgroundCli:
    """``python -m dgm_tf.main`` started now and collected later: output to files (no pipe
    to fill), killed if the session ends first."""

    def __init__(self, root, args, timeout=300):
        from tests.test_cli import REPO, cli_command

        argv, env = cli_command(*args)
        self.root, self.argv, self.timeout = pathlib.Path(root), argv, timeout
        with open(self.root / "stdout.txt", "w") as out, open(self.root / "stderr.txt", "w") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err, text=True)

    def wait(self) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return subprocess.CompletedProcess(self.argv, code, (self.root / "stdout.txt").read_text(),
                                           (self.root / "stderr.txt").read_text())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_SHARED_RUN = {}


def _start_dgm_cli_run(root):
    from tests.test_cli import DGM_RUN

    workdir = pathlib.Path(root) / "wd"
    return workdir, BackgroundCli(root, [*DGM_RUN, f"--workdir={workdir}"])


def pytest_collection_finish(session):
    # The shared run (below) is a subprocess: started as soon as the tests that read it
    # are known, it trains on the second core while the tests before them run (on 2 cores
    # the suite keeps one mostly idle; ~20 s of wall time).
    if session.config.option.collectonly or "run" in _SHARED_RUN:
        return
    if any("dgm_cli_run" in getattr(item, "fixturenames", ()) for item in session.items):
        root = tempfile.mkdtemp(prefix="dgm_cli_run-")
        _SHARED_RUN["root"] = root
        _SHARED_RUN["run"] = _start_dgm_cli_run(root)


def pytest_sessionfinish(session):
    if "run" in _SHARED_RUN:
        _SHARED_RUN["run"][1].stop()
    if "root" in _SHARED_RUN:
        shutil.rmtree(_SHARED_RUN["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def dgm_cli_run(tmp_path_factory):
    """One tiny 3-task DGMw run through ``python -m dgm_tf.main`` (``DGM_RUN`` in
    tests/test_cli.py: export on, validation every epoch, TensorBoard every step), started
    as a user's shell starts it (``cli_command``: oneDNN left to main), at the end of
    collection (``pytest_collection_finish``). test_cli, test_monitoring and test_resume
    read it (one run instead of three, ~45 s of the default suite); it is never written
    to: a test that resumes it works on a copy. Returns the workdir and the finished
    process (returncode, stdout, stderr)."""
    if "run" not in _SHARED_RUN:  # e.g. requested by a test collected after the session began
        _SHARED_RUN["run"] = _start_dgm_cli_run(tmp_path_factory.mktemp("dgm_cli_run"))
    workdir, background = _SHARED_RUN["run"]
    proc = background.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc
